"""`posttrain push RUN_DIR --stage NAME --repo org/name [--private]`, or a pipeline's `push:` block after a
successful run: publish one stage's model with a model card.

The card (README.md) states what the model is and how it was made: its lineage (the base model, then each stage
it descends from with its kind, data and key trainer settings, read from the run's resolved pipeline.yaml),
the run's forgetting table and plot (report/forgetting.json and .png, numbers unchanged), and the resolved
pipeline.yaml itself. As TRL's `generate_model_card` and mergekit's config-beside-the-model do, but the card
carries the forgetting report, which is what this harness measures.

The upload folder is a temporary ``<run-dir>/.push-<random>/`` holding hard links to the model's files (a copy
where links are refused) beside the card files, removed after the upload: the stage's own model folder is
never written to, so its DONE hashes still match and a rerun still skips it. Upload: huggingface_hub's
`HfApi.create_repo` (exist_ok) then `HfApi.upload_folder`, one commit.

`push: {repo: org/name, stage: NAME, private: false}` in a pipeline YAML (`PushConfig`) does the same at the end
of every successful run, as TRL's `push_to_hub: true` with `hub_model_id` and `hub_private_repo` does at the end
of training: the stage defaults to the last one. An L4 module (not a face) so that the pipeline can call it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from pydantic import Field, field_validator

from evals.run_report import finished_after
from posttrain.registry import did_you_mean
from posttrain.schema import ConfigError, Strict, read_yaml

# The trainer settings a reader of the card wants first; any other key is in the pipeline.yaml below it.
KEY_SETTINGS = ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                "gradient_accumulation_steps", "max_length", "beta", "loss_type", "num_generations")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PushConfig(Strict):
    """A pipeline's `push:` block: after a successful run, upload `stage`'s model to `repo` (as `posttrain push`)."""

    repo: str = Field(description="org/name on the Hugging Face hub")
    stage: str | None = Field(None, description="the stage whose model to push; None: the last stage")
    private: bool = Field(False, description="create the repository private")

    @field_validator("repo")
    @classmethod
    def _org_name(cls, v: str) -> str:
        if not _REPO.match(v):
            raise ValueError(f"expected org/name, got {v!r}")
        return v


class PushFailed(RuntimeError):
    """The hub refused an upload (no token, no rights, no network); one line for the user."""


def find_stage(run_dir: Path, name: str) -> tuple[dict, dict, Path]:
    """(pipeline.yaml as a dict, the stage's entry, its finished model folder); ConfigError on a folder that is no
    run dir, an unknown stage (did-you-mean) or one not finished."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run dir")
    if not (run_dir / "pipeline.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run dir (no pipeline.yaml)")
    pipe = read_yaml(run_dir / "pipeline.yaml")
    names = [s.get("name") for s in pipe.get("stages", [])]
    if name not in names:
        raise ConfigError(f"--stage {name}: no such stage in {run_dir}{did_you_mean(name, names)}; "
                          f"stages: {', '.join(names)}")
    index = names.index(name) + 1
    folder = run_dir / "stages" / f"{index:02d}_{name}"
    if not (folder / "DONE").is_file() or not (folder / "model").is_dir():
        raise ConfigError(f"--stage {name}: not finished in {run_dir} (no {folder.name}/DONE); run the pipeline first")
    _check_current(run_dir, pipe, name, names)
    return pipe, pipe["stages"][index - 1], folder / "model"


def _check_current(run_dir: Path, pipe: dict, name: str, names: list[str]) -> None:
    """Refuse a stage built from an earlier version of a stage it descends from: that one finished (reran,
    or had its mitigation undone) after this one did, so the card's lineage and scores would not be its own."""
    report_path = run_dir / "report" / "forgetting.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    folder = lambda n: run_dir / "stages" / f"{names.index(n) + 1:02d}_{n}"  # noqa: E731
    for other, then, mine in finished_after(folder(name), [folder(o) for o in ancestors(pipe, report, name)[:-1]]):
        raise ConfigError(f"--stage {name}: built from an earlier version of `{other}` ({other} finished at "
                          f"{then}, after {name} at {mine}); rerun the pipeline before pushing")


def ancestors(pipe: dict, report: dict | None, name: str) -> list[str]:
    """The stages `name` is built from, itself last, in pipeline order: by the lineage the report records
    (`parents`), else every stage up to it (a run without evals has no report)."""
    names = [s["name"] for s in pipe["stages"]]
    parents = {r["name"]: r.get("parents") for r in (report or {}).get("stages", [])}
    if parents.get(name) is None:
        return names[: names.index(name) + 1]
    seen, todo = {name}, [name]
    while todo:
        for p in parents.get(todo.pop()) or []:
            if p in names and p not in seen:
                seen.add(p)
                todo.append(p)
    return [n for n in names if n in seen]


def _data_cell(stage: dict) -> str:
    parts = []
    for d in stage.get("data") or []:
        text = str(d.get("source"))
        if d.get("limit"):
            text += f" (first {d['limit']})"
        parts.append(text)
    for m in stage.get("models") or []:  # a merge's inputs
        parts.append(str(m.get("model")) + (f" ×{m['weight']}" if m.get("weight") is not None else ""))
    return ", ".join(parts) or "–"


def _settings_cell(stage: dict) -> str:
    trainer = stage.get("trainer") or {}
    cells = [f"{k}={trainer[k]}" for k in KEY_SETTINGS if trainer.get(k) is not None]
    if stage.get("method"):
        cells.append(f"method={stage['method']}")
    trainable = stage.get("trainable") or {}
    if trainable.get("mode", "all") != "all":  # HFT: which parameters trained (the yaml below has the rest)
        cells.append(f"trainable={trainable['mode']}" + (f" {trainable['fraction']}" if trainable.get("fraction") else ""))
    if stage.get("lora"):
        cells.append(f"lora r={stage['lora'].get('r')}")
    return ", ".join(cells) or "–"


def _base(pipe: dict) -> str:
    """The model the first stage builds on, as the config names it (a merge's `base:`, else its `model:`)."""
    first = pipe["stages"][0]
    return str(first.get("base") or first.get("model") or "world")


def lineage_table(pipe: dict, report: dict | None, name: str) -> str:
    rows = [f"| 0 | base | – | {_base(pipe)} | – |"]
    for i, s in enumerate(pipe["stages"], start=1):
        if s["name"] in ancestors(pipe, report, name):
            rows.append(f"| {i} | {s['name']} | {s['kind']} | {_data_cell(s)} | {_settings_cell(s)} |")
    return "\n".join(["| # | stage | kind | data / models | key settings |", "|---|---|---|---|---|", *rows])


def forgetting_tables(report: dict) -> str:
    """Scores (value ± stderr) and change vs base of every row of forgetting.json, 4 decimals."""
    keys = list(report.get("tasks", {}))
    head = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    scores, deltas = list(head), list(head)
    for i, row in enumerate(report.get("stages", [])):
        cells, changes = [], []
        for key in keys:
            s = row.get("scores", {}).get(key) or {}
            cells.append("–" if s.get("value") is None else f"{s['value']:.4f}" + (
                f" ± {s['stderr']:.4f}" if s.get("stderr") is not None else ""))
            d = (report["tasks"][key].get("delta_vs_base") or [None] * (i + 1))[i]
            changes.append("–" if d is None else f"{d:+.4f}")
        scores.append(f"| {row['name']} | " + " | ".join(cells) + " |")
        deltas.append(f"| {row['name']} | " + " | ".join(changes) + " |")
    summ = report.get("summary", {})
    facts = [f"{k.replace('_', ' ')}: {summ[k]:.4f}" for k in ("average_forgetting", "backward_transfer")
             if isinstance(summ.get(k), (int, float))]
    return "\n".join(["### Scores", "", *scores, "", "### Change vs base", "", *deltas, "",
                      *([", ".join(facts) + " (report/forgetting.md explains each figure)", ""] if facts else [])])


def render_card(run_dir: Path, name: str, repo: str) -> str:
    """The README.md of the pushed model (see the module docstring)."""
    pipe, stage, _ = find_stage(run_dir, name)
    report_path = run_dir / "report" / "forgetting.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    kinds = sorted({s["kind"] for s in pipe["stages"] if s["name"] in ancestors(pipe, report, name)})
    front: dict[str, Any] = {"library_name": "transformers", "tags": ["posttrain", *kinds]}
    base = _base(pipe).split("@", 1)[0]  # a pinned hub model (org/name@rev): the hub links the card to org/name
    if _REPO.match(base) and not Path(base).expanduser().exists():  # a hub model: the hub links the card to it
        front["base_model"] = base
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {repo.split('/')[-1]}", "",
           f"Stage `{name}` ({stage['kind']}) of the posttrain pipeline `{pipe.get('name')}`.", "",
           "## Lineage", "", lineage_table(pipe, report, name), "", "## Forgetting", ""]
    if report is None:
        out += ["This run was not evaluated (`eval.enabled: false`): no forgetting report.", ""]
    else:
        out += [forgetting_tables(report)]
        if (run_dir / "report" / "forgetting.png").is_file():
            out += ["![forgetting](forgetting.png)", ""]
    out += ["## Pipeline", "", "The resolved pipeline.yaml of the run (also in this repository):", "", "```yaml",
            (run_dir / "pipeline.yaml").read_text().rstrip(), "```", ""]
    return "\n".join(out)


def stage_folder(run_dir: Path, name: str, repo: str, dest: Path) -> Path:
    """Fill `dest` with the stage's model files (hard links, copies where links are refused), README.md,
    pipeline.yaml and the report's forgetting.json and .png."""
    card = render_card(run_dir, name, repo)
    _, _, model = find_stage(run_dir, name)
    for src in sorted(model.rglob("*")):
        if src.is_file():
            target = dest / src.relative_to(model)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, target)
            except OSError:  # another file system, or links not allowed there
                shutil.copy2(src, target)
    (dest / "README.md").write_text(card)
    shutil.copy2(run_dir / "pipeline.yaml", dest / "pipeline.yaml")
    for f in ("forgetting.json", "forgetting.png"):
        if (run_dir / "report" / f).is_file():
            shutil.copy2(run_dir / "report" / f, dest / f)
    return dest


def hub_problem() -> str | None:
    """Why an upload would be refused before it starts, or None: HF_HUB_OFFLINE is set (huggingface_hub then
    refuses every call), or no token is found (HF_TOKEN, the token file of `hf auth login`). A `push:` block is
    checked before the run (pipeline.check_services), not after hours of training; `posttrain push` before it
    stages the folder. A token the hub refuses still fails at the upload, in one line."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it to push"
    if os.environ.get("HF_OIDC_RESOURCE"):  # a token exchanged at the upload (trusted publishing)
        return None
    try:
        token = get_token()
    except Exception:  # noqa: BLE001 - a refresh that failed: the upload says why, in one line
        return None
    return None if token else "no Hugging Face token: run `hf auth login` or set HF_TOKEN"


def push(run_dir: Path, name: str, repo: str, private: bool = False,
         log: Callable[[str], None] = print) -> str:
    """Render, stage and upload; returns the repository's URL."""
    if not _REPO.match(repo):
        raise ConfigError(f"--repo {repo}: expected org/name")
    find_stage(run_dir, name)  # bad input fails before huggingface_hub is imported
    problem = hub_problem()
    if problem:
        raise ConfigError(f"push: {problem}")
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix=".push-", dir=run_dir) as tmp:
        folder = stage_folder(run_dir, name, repo, Path(tmp))
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                          commit_message=f"posttrain push: stage {name} of {run_dir.name}")
    log(f"pushed {name} to {url}")
    return str(url)


def push_after_run(block: PushConfig, run_dir: Path, stages: list[str], log: Callable[[str], None] = print) -> str:
    """A pipeline's `push:` block, once its run has finished: `push` of `block.stage` (default the last stage).
    A refused upload raises PushFailed in one line; the run's stages are done, so a rerun skips them and pushes."""
    name = block.stage or stages[-1]
    try:
        return push(run_dir, name, block.repo, block.private, log)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub refused: one line, as `posttrain push` prints it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PushFailed(f"push: {name} to {block.repo}: {first} (the run is finished; rerun it, or `posttrain push "
                         f"{run_dir} --stage {name} --repo {block.repo}`, to push again)") from None


def add_parser(sub: Any) -> None:
    p = sub.add_parser("push", help="upload one stage's model to the Hugging Face hub with a model card")
    p.add_argument("run_dir")
    p.add_argument("--stage", required=True, help="the stage whose model to push")
    p.add_argument("--repo", required=True, help="org/name on the hub")
    p.add_argument("--private", action="store_true", help="create the repository private")


def push_command(args: argparse.Namespace) -> int:
    """`posttrain push`: bad input exits 2 (raised to the CLI); a failed upload exits 1 with one line."""
    run_dir = Path(args.run_dir)
    find_stage(run_dir, args.stage)
    try:
        push(run_dir, args.stage, args.repo, args.private, log=lambda m: print(m, file=sys.stderr))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub refused (no token, no rights, no network): one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: push to {args.repo}: {first}", file=sys.stderr)
        return 1
    return 0
