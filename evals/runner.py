"""Evaluate model folders with lm-evaluation-harness and keep the results beside each stage.

lm-eval does the prompting, generation and metrics (`simple_evaluate` with the `hf` model on CPU, `vllm` on
GPU). This module only renders the world's task YAMLs with the local data path, calls lm-eval with the same
suite and settings for every model, records provenance, reuses an eval whose model and task hashes match, and
turns lm-eval's results into `{"<task>/<metric>": {"value", "stderr"}}` for the forgetting report.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from posttrain.config import ConfigError, EvalConfig, Strict, read_yaml
from posttrain.rundir import atomic_write_json, hash_folder, sha256_json

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
        from posttrain.registry import did_you_mean

        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
        raise ConfigError(f"eval.suite: unknown suite {name_or_path!r}{did_you_mean(name_or_path, known)}; known: {', '.join(known)}")
    try:
        return Suite.model_validate(read_yaml(path))
    except Exception as e:  # noqa: BLE001 - pydantic error -> one line naming the file
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None


def render_world_tasks(log: Callable[[str], None] = print, split: str = "test") -> tuple[Path, dict[str, str]]:
    """Write the world task YAMLs with the data path filled in; returns (include dir, task -> sha256).

    `split="dev"` renders the same tasks scoring the dev split (for coefficient searches), so that choosing
    coefficients never looks at the test split the report shows.
    """
    from posttrain.world import world_dir

    if split not in ("test", "dev"):
        raise ConfigError(f"eval split must be 'test' or 'dev', got {split!r}")
    world = world_dir(log)
    out = world / ("lm_eval_tasks" if split == "test" else f"lm_eval_tasks_{split}")
    out.mkdir(exist_ok=True)
    hashes = {}
    for src in sorted(WORLD_TASKS_DIR.glob("*.yaml")):
        text = src.read_text().replace("__WORLD_DATA__", str(world / "data"))
        if split != "test":
            text = text.replace("test_split: test", f"test_split: {split}")
        dest = out / src.name
        if not dest.is_file() or dest.read_text() != text:
            dest.write_text(text)
        hashes[src.stem] = sha256_json(text)
    return out, hashes


def _backend(requested: str) -> str:
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"


def scores_from_results(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's {"task": {"metric,filter": v, "metric_stderr,filter": se}} -> {"task/metric": {value, stderr}}."""
    scores = {}
    for task, metrics in results.get("results", {}).items():
        keys = [k for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
        for key in keys:
            value = metrics[key]
            metric, flt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            # A metric under one filter is named plainly; several filters of one metric keep "@filter".
            alone = sum(k.split(",", 1)[0] == metric for k in keys) == 1
            name = f"{task}/{metric}" if alone else f"{task}/{metric}@{flt}"
            scores[name] = {"value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return scores


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
) -> dict[str, Any]:
    """Evaluate one model folder; reuse `out` when it holds the same model hash, task hashes and settings.

    `tasks` narrows the suite (e.g. a coefficient search scoring one task); `split="dev"` scores dev splits.
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
    world_tasks = any(t.startswith("world_") for t in spec.tasks)
    include, task_hashes = render_world_tasks(log, split) if world_tasks else (None, {})
    task_hashes = {t: task_hashes.get(t, f"lm_eval:{t}") for t in spec.tasks}
    model_path = Path(model_dir)
    model_hash = sha256_json(hash_folder(model_path)) if model_path.is_dir() else f"hub:{model_dir}"
    limit = settings.limit if settings.limit is not None else spec.limit
    key = {"model_sha256": model_hash, "task_hashes": task_hashes, "limit": limit, "seed": settings.seed,
           "num_fewshot": settings.num_fewshot, "suite": spec.model_dump(), "max_new_tokens": settings.max_new_tokens,
           "split": split}
    if out and Path(out).is_file():
        old = json.loads(Path(out).read_text())
        if old.get("key") == key:
            log(f"eval: reusing {out}")
            return old
    record = _run_lm_eval(model_dir, spec, include, limit, settings, log)
    record.update(model=str(model_dir), key=key, **key, versions=_versions())
    if out:
        atomic_write_json(Path(out), record)
    return record


def _has_chat_template(model_dir: str) -> bool:
    """False for a local model folder whose tokenizer has no chat template (a hub name is left to lm-eval)."""
    if not Path(model_dir).is_dir():
        return True
    from transformers import AutoTokenizer

    try:
        return bool(AutoTokenizer.from_pretrained(model_dir).chat_template)
    except Exception:  # noqa: BLE001 - a broken folder: lm-eval loads it next and names the problem
        return True


def _run_lm_eval(model_dir, spec: Suite, include, limit, settings: EvalConfig, log) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from posttrain.models import fit_cpu_threads, folder_params

    backend = _backend(settings.backend)
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError("eval.backend: vllm is not installed; pip install -e .[gpu]") from None
        model_args = {"pretrained": model_dir, "dtype": "auto", "seed": settings.seed}
    else:
        model_args = {"pretrained": model_dir, "dtype": "float32", "device": _device()}
        if model_args["device"] == "cpu":
            fit_cpu_threads(folder_params(str(model_dir)))
    log(f"eval: {spec.name} ({', '.join(spec.tasks)}) on {model_dir} [{backend}, limit {limit}]")
    start = time.time()
    results = lm_eval.simple_evaluate(
        model=backend,
        model_args=model_args,
        tasks=list(spec.tasks),
        task_manager=TaskManager(include_path=str(include) if include else None),
        num_fewshot=settings.num_fewshot or None,
        batch_size=settings.batch_size,
        limit=limit,
        apply_chat_template=spec.apply_chat_template,
        gen_kwargs={"max_gen_toks": settings.max_new_tokens},
        random_seed=settings.seed,
        numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed,
        fewshot_random_seed=settings.seed,
        log_samples=False,
        bootstrap_iters=1000,
    )
    seconds = round(time.time() - start, 1)
    scores = scores_from_results(results)
    log("eval: " + ", ".join(f"{k}={v['value']:.3f}" for k, v in sorted(scores.items())) + f" ({seconds}s)")
    keep = {k: results.get(k) for k in ("results", "versions", "n-samples", "higher_is_better")}
    return {"scores": scores, "seconds": seconds, "backend": backend, "lm_eval": keep,
            "task_configs": {t: _config_hash(c) for t, c in (results.get("configs") or {}).items()}}


def _config_hash(cfg: Any) -> str:
    return sha256_json(cfg)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- the pipeline's hooks ------------------------------------------------------------------------------------


def _trains_on(stage: Any) -> list[str]:
    """Explicit `trains_on:`, else the world tasks the stage trains on (world_<task>)."""
    if stage is None:
        return []
    if stage.trains_on:
        return list(stage.trains_on)
    from posttrain.world.tasks import TASKS

    return [f"world_{d.source}" for d in getattr(stage, "data", None) or [] if d.source in TASKS]


def _record(name: str, folder: str, model_dir: str, stage: Any, result: dict) -> dict:
    """A base or stage row of the report; `parents` (its lineage) when its eval.json records them."""
    record = {"name": name, "folder": folder, "model": model_dir, "scores": result["scores"],
              "trains_on": _trains_on(stage)}
    if "parents" in result:
        record["parents"] = list(result["parents"])
    return record


def reference_record(ref: str, folder: Path, model_dir: str, result: dict, input_of: str) -> dict:
    """The reference row of an input model that is not a stage of the run (see posttrain.pipeline)."""
    return {"name": f"input:{ref}", "folder": str(folder), "model": model_dir, "scores": result["scores"],
            "trains_on": [], "reference": True, "input_of": input_of}


def keep_in_eval(out: Path, result: dict, **fields: Any) -> dict:
    """`result` with `fields` set, rewriting the eval.json at `out` when they differ, so that `posttrain
    report` rebuilds from the eval.json files the rows the pipeline built (the lineage above all)."""
    if all(result.get(k) == v for k, v in fields.items()):
        return result
    result = {**result, **fields}
    atomic_write_json(out, result)
    return result


def _hft_sections(run_dir: Path) -> list[str]:
    """One markdown line per stage that wrote a trainable.json (HFT / patterns masks)."""
    lines = []
    for path in sorted((run_dir / "stages").glob("[0-9]*/trainable.json")):
        info = json.loads(path.read_text())
        total = info["trained"] + info["frozen"]
        lines.append(f"- `{path.parent.name}`: mode `{info['mode']}`, trained {info['trained']:,} of {total:,} "
                     f"parameters ({100 * info['trained'] / max(total, 1):.1f}%)")
    return ["## Trainable parameters\n\n" + "\n".join(lines) + "\n"] if lines else []


def evaluate_into_run(pipe: Any, stage: Any, folder: str, model_dir: str) -> None:
    """Evaluate after a stage (or the base), rewrite the forgetting report, apply the max_drop gate."""
    from evals.forgetting import check_gate
    from evals.report import write_report
    from posttrain.pipeline import PipelineError

    out = pipe.rd.stages / folder / "eval.json"
    result = evaluate_model(model_dir, out=out, settings=pipe.cfg.eval, log=pipe.log)
    parents = [] if stage is None else list(pipe.parents.get(stage.name, []))
    result = keep_in_eval(out, result, model=model_dir, parents=parents)
    name = "base" if stage is None else stage.name
    pipe.records.append(_record(name, folder, model_dir, stage, result))
    report_dir = pipe.rd.root / "report"
    write_report(pipe.records, report_dir, extra_sections=_hft_sections(pipe.rd.root))
    pipe.log(f"report: {report_dir / 'forgetting.md'}")
    if stage is None or not pipe.cfg.eval.max_drop:
        return
    for msg in check_gate(pipe.records, pipe.cfg.eval.max_drop):
        if pipe.cfg.eval.on_drop == "stop":
            raise PipelineError(f"eval gate: {msg}")
        pipe.log(f"warning: eval gate: {msg}")


def _reference_records(run_dir: Path, stage: Any, shown: set[str]) -> list[dict]:
    """The reference rows the pipeline put before `stage`, from `inputs/<ref>/eval.json`: the same refs in the
    same order, skipping stage references and models that already have a row, as Pipeline._evaluate_inputs."""
    from posttrain.pipeline import input_folder, is_stage_ref

    names = getattr(stage, "reference_models", None)
    records = []
    for ref in names() if names else []:
        path = run_dir / input_folder(ref) / "eval.json"
        if is_stage_ref(ref) or not path.is_file():  # no file: a LoRA adapter, or evals were off
            continue
        result = json.loads(path.read_text())
        if result["model"] in shown:
            continue
        shown.add(result["model"])
        records.append(reference_record(ref, input_folder(ref), result["model"], result, stage.name))
    return records


def rerender_report(run_dir: Path) -> Path:
    """Rebuild report/ from the eval.json files of a run dir: the rows the pipeline wrote, in its order.

    The base, then per stage with an eval.json: the reference rows of its inputs (inputs/<ref>/eval.json),
    then the stage itself, with the lineage (`parents`) its eval.json records.
    """
    import yaml

    import posttrain.stages  # noqa: F401
    from evals.report import write_report
    from posttrain.registry import STAGES

    pipe_file = run_dir / "pipeline.yaml"
    if not pipe_file.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no pipeline.yaml)")
    cfg = yaml.safe_load(pipe_file.read_text())
    records: list[dict] = []
    shown: set[str] = set()
    base = run_dir / "stages" / "00_base" / "eval.json"
    if base.is_file():
        result = json.loads(base.read_text())
        records.append(_record("base", "00_base", result["model"], None, result))
        shown.add(result["model"])
    for i, raw in enumerate(cfg["stages"], start=1):
        folder = f"{i:02d}_{raw['name']}"
        path = run_dir / "stages" / folder / "eval.json"
        if path.is_file():
            stage = STAGES.get(raw["kind"]).config.model_validate(raw)
            records += _reference_records(run_dir, stage, shown)
            result = json.loads(path.read_text())
            records.append(_record(raw["name"], folder, result["model"], stage, result))
            shown.add(result["model"])
    if not records:
        raise ConfigError(f"{run_dir}: no eval.json found; nothing to report")
    out = run_dir / "report"
    write_report(records, out, extra_sections=_hft_sections(run_dir))
    return out / "forgetting.md"
