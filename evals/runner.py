"""Evaluate model folders with lm-evaluation-harness and keep the results beside each stage.

lm-eval does the prompting, generation and metrics (`simple_evaluate` with the `hf` model on CPU, `vllm` on
GPU). This module only renders the world's task YAMLs with the local data path, calls lm-eval with the same
suite and settings for every model, records provenance, reuses an eval whose model and task hashes match (from
the run dir, or from any run through evals/cache.py), and turns lm-eval's results into
`{"<task>/<metric>": {"value", "stderr"}}` for the forgetting report.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import Field

from evals import cache
from evals.config import EvalConfig
from evals.scores import items_from_samples, scores_from_results  # noqa: F401 (tests import them here)
from posttrain import rollout
from posttrain import world as _world  # through the module: tests replace world_dir
from posttrain.hub_pins import snapshot_identity
from posttrain.models import fit_cpu_threads, folder_params
from posttrain.progress import terminal_only_bars
from posttrain.registry import did_you_mean
from posttrain.rundir import atomic_write_json, hash_folder, sha256_json
from posttrain.schema import ConfigError, Strict, read_yaml, validated

HERE = Path(__file__).resolve().parent
WORLD_TASKS_DIR = HERE / "tasks" / "world"
SUITES_DIR = HERE / "suites"


class Suite(Strict):
    name: str
    tasks: list[str] = Field(min_length=1)
    apply_chat_template: bool = True
    limit: int | None = None


def load_suite(name_or_path: str) -> Suite:
    path = Path(name_or_path)
    if not path.is_file():
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():

        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
        raise ConfigError(f"eval.suite: unknown suite {name_or_path!r}{did_you_mean(name_or_path, known)}; known: {', '.join(known)}")
    return validated(Suite, read_yaml(path), str(path))


def render_world_tasks(log: Callable[[str], None] = print, split: str = "test") -> tuple[Path, dict[str, str]]:
    """Write the world task YAMLs with the data path filled in; returns (include dir, task -> sha256).

    `split="dev"` renders the same tasks scoring the dev split (for coefficient searches), so that choosing
    coefficients never looks at the test split the report shows.
    """
    if split not in ("test", "dev"):
        raise ConfigError(f"eval split must be 'test' or 'dev', got {split!r}")
    world = _world.world_dir(log)
    out = world / ("lm_eval_tasks" if split == "test" else f"lm_eval_tasks_{split}")
    out.mkdir(exist_ok=True)
    hashes = {}
    for src in sorted(WORLD_TASKS_DIR.glob("*.yaml")):
        text = _rendered_task(src, world, split)
        dest = out / src.name
        if not dest.is_file() or dest.read_text() != text:
            dest.write_text(text)
        hashes[src.stem] = _task_hash(src, split)
    return out, hashes


def _task_hash(src: Path, split: str) -> str:
    """A world task's identity: its YAML as rendered into a folder named by the world's version, not by this
    machine's cache path, so a run dir copied elsewhere still compares (the world's data is a function of its
    version)."""
    return sha256_json(_rendered_task(src, Path(f"world-{_world.VERSION}"), split))


def _rendered_task(src: Path, world: Path, split: str) -> str:
    """The text of one world task YAML as lm-eval reads it: the data path filled in, `split` scored."""
    text = src.read_text().replace("__WORLD_DATA__", str(world / "data"))
    return text if split == "test" else text.replace("test_split: test", f"test_split: {split}")


def _backend(requested: str) -> str:
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("lm_eval", "transformers", "torch", "posttrain", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def evaluate_model(
    model_dir: str,
    suite: str = "world",
    limit: int | None = None,
    out: str | Path | None = None,
    settings: EvalConfig | None = None,
    log: Callable[[str], None] = print,
    split: str = "test",
    tasks: list[str] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate one model folder; reuse `out` when it holds the same model hash, task hashes and settings.

    `tasks` narrows the suite (e.g. a coefficient search scoring one task); `split="dev"` scores dev splits.
    `trust_remote_code` lets lm-eval run a model's own code (`posttrain eval --trust-remote-code`).
    """
    settings = settings or EvalConfig(suite=suite, limit=limit)
    spec = load_suite(settings.suite)
    if tasks:
        unknown = [t for t in tasks if t not in spec.tasks]
        if unknown:
            raise ConfigError(f"task {unknown[0]!r} is not in suite {spec.name!r} ({', '.join(spec.tasks)})")
        spec = spec.model_copy(update={"tasks": list(tasks)})
    if spec.apply_chat_template and not _has_chat_template(model_dir):
        # lm-eval would stop on a base model without a template (GPT-2 style); such a model is scored on plain
        # prompts, and eval.json's suite says so (apply_chat_template: false).
        log(f"eval: {model_dir} has no chat template; scoring plain prompts")
        spec = spec.model_copy(update={"apply_chat_template": False})
    if split != "test" and any(not t.startswith("world_") for t in spec.tasks):
        # lm-eval scores its own tasks on their test split whatever is asked: a "dev" score would be a test one
        raise ConfigError(f"a {split}-split eval needs world tasks; suite {spec.name!r} has "
                          f"{', '.join(t for t in spec.tasks if not t.startswith('world_'))}")
    if split != "test":  # a dev-split score must not read as a test score in the log
        log = functools.partial(_split_line, log, split)
    world_tasks = any(t.startswith("world_") for t in spec.tasks)
    include, task_hashes = render_world_tasks(log, split) if world_tasks else (None, {})
    model_path = Path(model_dir)
    # A hub snapshot is named by its commit (hub:<name>@<commit>, posttrain.hub_pins): no need to hash its files.
    model_hash = (snapshot_identity(model_path) or sha256_json(hash_folder(model_path))) if model_path.is_dir() \
        else f"hub:{model_dir}"
    key = {"model_sha256": model_hash, **eval_settings(settings, spec, task_hashes, split)}
    limit = key["limit"]
    if out and Path(out).is_file():
        old = json.loads(Path(out).read_text())
        if old.get("key") == key:
            log(f"eval: reusing {out}")
            return old
    versions = _versions()
    addr = cache.address(key, settings.batch_size, versions)
    hit = cache.lookup(addr)
    if hit:
        log(f"eval: reusing the eval of the same model files and settings ({hit[0].get('model')}; {hit[1]})")
        record = {**hit[0], "model": str(model_dir), "cached_from": hit[0].get("model")}
    else:
        opt_in = {"trust_remote_code": True} if trust_remote_code else {}  # as before when unset (tests fake 6 args)
        record = _run_lm_eval(model_dir, spec, include, limit, settings, log, **opt_in)
        record.update(model=str(model_dir), key=key, **key, versions=versions)
        cache.store(addr, record)
    if out:
        atomic_write_json(Path(out), record)
    return record


def _split_line(log: Callable[[str], None], split: str, line: str) -> None:
    log(line.replace("eval: ", f"eval ({split} split): ", 1) if line.startswith("eval: ") else line)


def eval_settings(settings: EvalConfig, spec: Suite, world_hashes: dict[str, str], split: str = "test") -> dict:
    """An eval's key without the model hash: the settings two evals must share for their scores to compare.

    `world_hashes` holds the rendered world tasks' hashes; a task not in it (lm-eval's own) is named instead.
    """
    return {"task_hashes": {t: world_hashes.get(t, f"lm_eval:{t}") for t in spec.tasks},
            "limit": settings.limit if settings.limit is not None else spec.limit, "seed": settings.seed,
            "num_fewshot": settings.num_fewshot, "suite": spec.model_dump(), "max_new_tokens": settings.max_new_tokens,
            "split": split, "backend": _backend(settings.backend),  # vLLM and transformers generate differently
            # only when on, so the keys of evals made before the field existed still match
            **({"log_samples": True} if settings.log_samples else {})}


def current_eval_settings(settings: EvalConfig, split: str = "test") -> dict:
    """`eval_settings` of what `evaluate_model` would run now with `settings`, without building the world.

    The world task hashes cover the task YAMLs and the world's version, not the cache path (`_task_hash`).
    """
    spec = load_suite(settings.suite)
    hashes = {src.stem: _task_hash(src, split) for src in sorted(WORLD_TASKS_DIR.glob("*.yaml"))}
    return eval_settings(settings, spec, hashes, split)


_SETTINGS = ("suite", "limit", "seed", "num_fewshot", "max_new_tokens", "split", "backend")
_BEFORE_BACKEND = "hf"  # a key from before keys named the backend: transformers, the CPU default


def settings_differences(key: dict | None, expected: dict) -> list[str]:
    """How an eval.json's `key` departs from `expected` (`current_eval_settings`), one phrase each; [] when
    its scores compare with evals made now. The model hash is not compared: it is what differs between rows.

    A suite recorded with `apply_chat_template: false` where the suite says true matches: `evaluate_model`
    scores a model without a chat template on plain prompts, and that is a property of the model, not of
    the settings.
    """
    if not isinstance(key, dict):
        return ["no eval settings recorded (no key)"]
    out = []
    for field in _SETTINGS:
        got, want = key.get(field, _BEFORE_BACKEND if field == "backend" else None), expected[field]
        phrase = _suite_difference(got, want) if field == "suite" else None
        if phrase or (field != "suite" and got != want):
            out.append(phrase or f"{field} {got!r} (pipeline: {want!r})")
    hashes = key.get("task_hashes") if isinstance(key.get("task_hashes"), dict) else {}
    changed = sorted(t for t in set(hashes) | set(expected["task_hashes"])
                     if hashes.get(t) != expected["task_hashes"].get(t))
    if changed:
        out.append("task files of " + ", ".join(changed) + " differ from the current ones")
    return out


def _suite_difference(got: Any, want: dict) -> str | None:
    """One phrase for a recorded suite that is not `want` (see `settings_differences`), else None."""
    if not isinstance(got, dict):
        return f"suite {got!r} (pipeline: {want['name']!r})"
    if got.get("apply_chat_template") is False:
        got = {**got, "apply_chat_template": want["apply_chat_template"]}
    if got == want:
        return None
    if got.get("name") != want["name"]:
        return f"suite {got.get('name')!r} (pipeline: {want['name']!r})"
    fields = [f"{k} {got.get(k)!r} (now {want.get(k)!r})"
              for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    return f"suite {want['name']!r} as it was then: " + ", ".join(fields)


def _has_chat_template(model_dir: str) -> bool:
    """False for a local model folder whose tokenizer has no chat template (a hub name is left to lm-eval).

    Read from the files transformers saves a template in (chat_template.jinja, chat_template.json,
    additional_chat_templates/, or tokenizer_config.json's `chat_template`) rather than by loading the
    tokenizer: this runs before every eval's reuse check, and loading cost a rerun ~0.8 s an eval."""
    path = Path(model_dir)
    if not path.is_dir():
        return True
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file() \
            or any((path / "additional_chat_templates").glob("*.jinja")):
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return True  # no readable tokenizer config: lm-eval loads the folder next and names the problem


def _run_lm_eval(model_dir, spec: Suite, include, limit, settings: EvalConfig, log,
                 trust_remote_code: bool = False) -> dict[str, Any]:
    import lm_eval

    backend = _backend(settings.backend)
    if backend == "vllm":

        if not rollout.vllm_installed():
            raise ConfigError(f"eval.backend: vllm is not installed; {rollout.GPU_INSTALL}")
        # lm-eval passes keys it does not know on to vllm.LLM.
        model_args = {"pretrained": model_dir, "dtype": "auto", "seed": settings.seed,
                      "gpu_memory_utilization": settings.gpu_memory_utilization}
    else:
        model_args = {"pretrained": model_dir, "dtype": "float32", "device": _device()}
        if model_args["device"] == "cpu":
            fit_cpu_threads(folder_params(str(model_dir)))
    if trust_remote_code:
        model_args["trust_remote_code"] = True
    log(f"eval: {spec.name} ({', '.join(spec.tasks)}) on {model_dir} [{backend}, limit {limit}]")
    start = time.time()
    # lm-eval's bars: on a terminal only (posttrain.progress); its model modules are imported lazily.
    bars = _importable("lm_eval.api.task", "lm_eval.api.model",
                       "lm_eval.models." + ("vllm_causallms" if backend == "vllm" else "huggingface"))
    with _no_git_hash(), terminal_only_bars(*bars), \
            _device_memory_freed(backend == "vllm" or model_args.get("device") == "cuda"):
        results = lm_eval.simple_evaluate(
            model=backend,
            model_args=model_args,
            tasks=list(spec.tasks),
            task_manager=_task_manager(str(include) if include else None, tuple(spec.tasks)),
            num_fewshot=settings.num_fewshot or None,
            batch_size=settings.batch_size,
            limit=limit,
            apply_chat_template=spec.apply_chat_template,
            gen_kwargs={"max_gen_toks": settings.max_new_tokens},
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
            log_samples=settings.log_samples,
            bootstrap_iters=1000,
        )
    seconds = round(time.time() - start, 1)
    scores = scores_from_results(results)
    log("eval: " + ", ".join(f"{k}={v['value']:.3f}" for k, v in sorted(scores.items())) + f" ({seconds}s)")
    keep = {k: results.get(k) for k in ("results", "versions", "n-samples", "higher_is_better")}
    record = {"scores": scores, "seconds": seconds, "backend": backend, "lm_eval": keep,
              "task_configs": {t: _config_hash(c) for t, c in (results.get("configs") or {}).items()}}
    if settings.log_samples:
        record["items"] = items_from_samples(results.get("samples") or {}, scores)
    return record


@functools.lru_cache(maxsize=8)
def _importable(*names: str) -> list:
    """The modules of `names` that import; one that does not (lm-eval's vLLM model without vllm) is left to
    lm-eval, which reports it when it loads the model."""
    out = []
    for name in names:
        try:
            out.append(importlib.import_module(name))
        except ImportError:
            pass
    return out


def _task_manager(include: str | None, tasks: tuple[str, ...]):
    """lm-eval's task index, built once per process. Indexing lm-eval's ~13,000 built-in task files takes 10-20 s
    on 2 cores, so a suite whose tasks are all under `include` (the world's) indexes only that folder."""
    from lm_eval.tasks import TaskManager

    if include:
        own = TaskManager(include_path=include, include_defaults=False)
        if set(tasks) <= set(own.all_tasks):
            return own
    return TaskManager(include_path=include)


@contextlib.contextmanager
def _device_memory_freed(on: bool) -> Iterator[None]:
    """With `on`, collect garbage and return PyTorch's cached GPU memory to the driver before and after the eval.

    Before: vLLM starts only when its `gpu_memory_utilization` share of the GPU is free, and the model of the
    stage that just trained is held in reference cycles, so it is freed only when the garbage collector runs
    (train_and_save has dropped the trainer's own references). After: the eval's own engine, so the next
    stage trains on a free GPU. accelerate's clear_device_cache does both steps (gc.collect, empty_cache).
    """
    from accelerate.utils.memory import clear_device_cache

    if on:
        clear_device_cache(garbage_collection=True)
    try:
        yield
    finally:
        if on:
            clear_device_cache(garbage_collection=True)


@contextlib.contextmanager
def _no_git_hash() -> Iterator[None]:
    """Keep lm-eval from running `git describe` while it evaluates.

    lm-eval 0.4 records a commit (`results["git_hash"]`) by running `git describe --always` with the
    caller's stderr, so every eval outside a git checkout printed `fatal: not a git repository`. No argument
    of `simple_evaluate` and no environment variable git or lm-eval honours turns that off, and sending fd 2
    elsewhere for the whole eval would hide lm-eval's own warnings and progress. eval.json keeps no git_hash
    (it records package versions), so the name `lm_eval.evaluator` calls returns None for the length of the
    call, and is put back after it; a later lm-eval without that name is left alone.
    """
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:
        yield
        return
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _config_hash(cfg: Any) -> str:
    return sha256_json(cfg)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
