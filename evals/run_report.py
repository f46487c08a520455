"""The evals of a run: after the base and every stage (`evaluate_into_run`, called by posttrain.pipeline), the
rows of the forgetting report, and `posttrain report`, which rebuilds it from the eval.json files of a run dir,
leaving out rows not comparable with the pipeline's eval settings. Evaluating one model: evals.runner.

The pipeline calls down into this module, never the other way: a run is read through `EvaluatedRun` (what a
run holds for its report), and a stage config through the stage registry, which the caller fills
(`import posttrain.stages`; the CLI and `posttrain.config` do).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Protocol

from evals import mitigation, runner
from evals.config import EvalConfig
from evals.forgetting import check_gate
from evals.report import stage_line, write_report
from posttrain.config_refs import STAGE_REF
from posttrain.registry import STAGES
from posttrain.rundir import atomic_write_json, input_folder, is_stage_ref
from posttrain.schema import ConfigError, read_yaml, validated
from posttrain.world.tasks import TASKS


class EvalGateStop(RuntimeError):
    """The eval.max_drop gate stopped the run (`on_drop: stop`); one line naming the stage and the task."""


class EvalGateMitigate(RuntimeError):
    """The eval.max_drop gate broke with `on_drop: mitigate`: the pipeline interpolates (posttrain.mitigate)."""

    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages))
        self.messages = messages


class EvaluatedRun(Protocol):
    """What a run shows its evals: posttrain.pipeline.Pipeline has these."""

    root: Path  # the run dir
    settings: EvalConfig  # the pipeline's eval block
    stage_names: list[str]  # every stage of the pipeline, in order
    base_ref: str | None  # the model the base row evaluates, as the config names it (`base_ref`)
    records: list[dict]  # the report's rows so far, base first; appended to here
    parents: dict[str, list[str]]  # stage name -> the rows it is built from
    log: Callable[[str], None]


def base_ref(first: Any) -> str | None:
    """The model the report's base row evaluates, as the config names it: what the first stage builds on
    (`builds_on()`: a merge's `base:` rather than its unused `model:`), else its `model:` input (the world base
    by default; also for a linear merge, whose lineage starts at its first model but whose run is compared with
    the pipeline's base); None when that names a stage."""
    ref = first.builds_on() or first.model or "world"
    return None if STAGE_REF.match(ref) else ref




def _trains_on(stage: Any) -> list[str]:
    """Explicit `trains_on:`, else the world tasks the stage trains on (world_<task>)."""
    if stage is None:
        return []
    if stage.trains_on:
        return list(stage.trains_on)
    return [f"world_{d.source}" for d in stage.training_data() if d.source in TASKS]


def _record(name: str, folder: str, model_dir: str, stage: Any, result: dict, model_ref: str | None = None) -> dict:
    """A base or stage row of the report; `parents` (its lineage) when its eval.json records them; the base's
    `model_ref` (the model as the config names it: `world`, `world-sft`, a hub name) for the report to name it."""
    record = {"name": name, "folder": folder, "model": model_dir, "scores": result["scores"],
              "trains_on": _trains_on(stage)}
    if model_ref:
        record["model_ref"] = model_ref
    if "parents" in result:
        record["parents"] = list(result["parents"])
    return record


def reference_record(ref: str, folder: Path, model_dir: str, result: dict, input_of: str) -> dict:
    """The reference row of an input model that is not a stage of the run (see posttrain.pipeline)."""
    return {"name": f"input:{ref}", "folder": str(folder), "model": model_dir, "scores": result["scores"],
            "trains_on": [], "reference": True, "input_of": input_of}


def unmitigated_record(name: str, folder: str, result: dict) -> dict:
    """The reference row of a mitigated stage's trained model (stages/<folder>/unmitigated), placed before the
    stage's row, which is the interpolation kept (evals.mitigation)."""
    return {"name": f"{name}:unmitigated", "folder": f"stages/{folder}/unmitigated", "model": result["model"],
            "scores": result["scores"], "trains_on": [], "reference": True, "unmitigated_of": name}


def keep_in_eval(out: Path, result: dict, **fields: Any) -> dict:
    """`result` with `fields` set, rewriting the eval.json at `out` when they differ, so that `posttrain
    report` rebuilds from the eval.json files the rows the pipeline built (the lineage above all)."""
    if all(result.get(k) == v for k, v in fields.items()):
        return result
    result = {**result, **fields}
    atomic_write_json(out, result)
    return result


def _hft_sections(run_dir: Path) -> list[str]:
    """One markdown line per stage that wrote a trainable.json: what it trained (HFT / patterns / LoRA).

    A LoRA stage's file has a "lora" entry (posttrain.stages.common.select_parameters): its "trained" counts
    adapter elements and its base weights are all frozen. Files of older runs: docs/notes/run_formats.md.
    """
    lines = []
    for path in sorted((run_dir / "stages").glob("[0-9]*/trainable.json")):
        info = json.loads(path.read_text())
        total = info["trained"] + info["frozen"]
        pct = 100 * info["trained"] / max(total, 1)
        lora = info.get("lora")
        if lora:
            chosen = "" if info["mode"] == "all" else f" chosen by mode `{info['mode']}`"
            lines.append(f"- `{path.parent.name}`: LoRA r={lora['r']} on {len(lora['modules'])} modules{chosen}: "
                         f"{info['trained']:,} adapter parameters trained ({pct:.1f}% of {total:,}); "
                         "base weights frozen")
        elif "lora_target_modules" in info:
            targets = info["lora_target_modules"]
            on = f"`{targets}`" if isinstance(targets, str) else f"{len(targets)} modules"
            lines.append(f"- `{path.parent.name}`: LoRA on {on}, mode `{info['mode']}`: adapter parameters not "
                         "recorded (an older run); base weights frozen")
        else:
            lines.append(f"- `{path.parent.name}`: mode `{info['mode']}`, trained {info['trained']:,} of {total:,} "
                         f"parameters ({pct:.1f}%)")
    return ["## Trainable parameters\n\n" + "\n".join(lines) + "\n"] if lines else []


def evaluate_into_run(pipe: EvaluatedRun, stage: Any, folder: str, model_dir: str) -> dict:
    """Evaluate after a stage (or the base), rewrite the forgetting report, print the stage's gain and
    forgetting (`stage_line`), apply the max_drop gate; returns the report (forgetting.json's dict)."""
    out = pipe.root / "stages" / folder / "eval.json"
    result = runner.evaluate_model(model_dir, out=out, settings=pipe.settings, log=pipe.log)
    parents = [] if stage is None else list(pipe.parents.get(stage.name, []))
    result = keep_in_eval(out, result, model=model_dir, parents=parents)
    name = "base" if stage is None else stage.name
    ref = pipe.base_ref if stage is None else None
    pipe.records.append(_record(name, folder, model_dir, stage, result, model_ref=ref))
    report = write_run_report(pipe.root, pipe.records, pending=pending_stages(pipe.records, pipe.stage_names))
    for summ in report["stage_summaries"]:
        if stage is not None and summ["stage"] == stage.name:
            pipe.log(f"[{folder.replace('_', ' ', 1)}] {stage_line(summ)}")
    _gate(pipe, stage, folder)
    return report


def write_run_report(run_dir: Path, records: list[dict], **kw: Any) -> dict:
    """write_report with the run's own sections: what each stage trained, and the mitigations."""
    return write_report(records, run_dir / "report",
                        extra_sections=_hft_sections(run_dir) + mitigation.sections(run_dir, run_dir / "report"),
                        extra_json={"mitigation": mitigation.json_part(run_dir)}, **kw)


def _gate(pipe: EvaluatedRun, stage: Any, folder: str) -> None:
    """The eval.max_drop gate after a stage: stop the run (`on_drop: stop`), mitigate (`mitigate`: once; a kept
    interpolation that still breaks the gate on the test split is warned about), or warn."""
    if stage is None or not pipe.settings.max_drop:
        return
    messages = check_gate(pipe.records, pipe.settings.max_drop)
    mitigated = (pipe.root / "stages" / folder / mitigation.MITIGATION_FILE).is_file()
    if messages and pipe.settings.on_drop == "mitigate" and not mitigated:
        raise EvalGateMitigate(messages)
    for msg in messages:
        if pipe.settings.on_drop == "stop":
            raise EvalGateStop(f"eval gate: {msg}")
        pipe.log(f"warning: eval gate: {msg}" + (" (after mitigation, chosen on dev)" if mitigated else ""))


def pending_stages(records: list[dict], stage_names: list[str]) -> list[str]:
    """The stages of the pipeline that have no row yet, in order.

    The report a run writes holds only rows it has evaluated (or found evaluated with matching keys) itself:
    the eval.json a later stage's folder holds from an earlier attempt may be of a model this run is about to
    retrain (its config or inputs changed), which only the run can tell when it gets there. So after an
    interrupted rerun the report lists these stages instead of showing stale rows.
    """
    shown = {r["name"] for r in records}
    return [n for n in stage_names if n not in shown]


def _reference_records(run_dir: Path, stage: Any, shown: set[str]) -> list[tuple[dict, Any]]:
    """The reference rows the pipeline put before `stage`, from `inputs/<ref>/eval.json`, each with the key of
    that eval.json: the same refs in the same order, skipping stage references and models that already have a
    row, as Pipeline._evaluate_inputs."""
    records = []
    for ref in stage.reference_models():
        path = run_dir / input_folder(ref) / "eval.json"
        if is_stage_ref(ref) or not path.is_file():  # no file: a LoRA adapter, or evals were off
            continue
        result = json.loads(path.read_text())
        if result["model"] in shown:
            continue
        shown.add(result["model"])
        records.append((reference_record(ref, input_folder(ref), result["model"], result, stage.name),
                        result.get("key")))
    return records


def rerender_report(run_dir: Path) -> Path:
    """Rebuild report/ from the eval.json files of a run dir: the rows the pipeline wrote, in its order.

    The base, then per stage with an eval.json: the reference rows of its inputs (inputs/<ref>/eval.json),
    then the stage itself, with the lineage (`parents`) its eval.json records. A row whose scores do not
    compare with the others is left out of every metric and listed in the report as not comparable, with
    why (`not_comparable_rows`): its eval key's settings are not pipeline.yaml's eval block (an interrupted
    rerun with another `eval.limit`, say), or its stage was built from an earlier version of a parent. When
    that is the base, nothing has a base to compare with: a one-line error says so.
    """
    pipe_file = run_dir / "pipeline.yaml"
    if not pipe_file.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no pipeline.yaml)")
    cfg = read_yaml(pipe_file)  # a run dir may come from elsewhere: the same caps as any config
    records: list[dict] = []
    keys: list[Any] = []  # per record, the key of its eval.json
    shown: set[str] = set()
    base = run_dir / "stages" / "00_base" / "eval.json"
    if base.is_file():
        result = json.loads(base.read_text())
        first = STAGES.get(cfg["stages"][0]["kind"]).config.model_validate(cfg["stages"][0])
        records.append(_record("base", "00_base", result["model"], None, result, model_ref=base_ref(first)))
        keys.append(result.get("key"))
        shown.add(result["model"])
    for i, raw in enumerate(cfg["stages"], start=1):
        folder = f"{i:02d}_{raw['name']}"
        path = run_dir / "stages" / folder / "eval.json"
        if path.is_file():
            stage = STAGES.get(raw["kind"]).config.model_validate(raw)
            for record, key in _reference_records(run_dir, stage, shown):
                records.append(record)
                keys.append(key)
            unmitigated = run_dir / "stages" / folder / "unmitigated" / "eval.json"
            if unmitigated.is_file():
                before = json.loads(unmitigated.read_text())
                records.append(unmitigated_record(raw["name"], folder, before))
                keys.append(before.get("key"))
            result = json.loads(path.read_text())
            records.append(_record(raw["name"], folder, result["model"], stage, result))
            keys.append(result.get("key"))
            shown.add(result["model"])
    if not records:
        raise ConfigError(f"{run_dir}: no eval.json found; nothing to report")
    settings = validated(EvalConfig, cfg.get("eval") or {}, f"{pipe_file}: eval")
    expected = runner.current_eval_settings(settings)
    left_out = not_comparable_rows(records, keys, expected, run_dir)
    if records[0]["name"] == "base" and left_out and left_out[0]["name"] == "base":
        raise ConfigError(f"{run_dir / left_out[0]['eval']}: the base was evaluated with other settings than "
                          f"pipeline.yaml's eval block ({'; '.join(left_out[0]['why'])}), so no row has a base to "
                          "compare with; rerun the pipeline to re-evaluate")
    names = {r["name"] for r in left_out}
    out = run_dir / "report"
    write_run_report(run_dir, [r for r in records if r["name"] not in names], not_comparable=left_out)
    return out / "forgetting.md"


def not_comparable_rows(records: list[dict], keys: list[Any], expected: dict, run_dir: Path) -> list[dict]:
    """`[{"name", "eval", "why": [...]}]` for the records (`keys`: their eval.json keys) whose scores do not
    compare with evals made now: settings that differ from `expected` (`settings_differences`), or a stage
    built from an earlier version of a parent: its DONE is older than the parent's (a parent that reran
    always makes its children rerun, so such a child is stale until the next run retrains it), or its parent
    is such a stage. A record without `parents` (docs/notes/run_formats.md) descends from the row before it."""
    out, stale, previous = [], set(), "base"
    dirs = {r["name"]: run_dir / "stages" / r["folder"] for r in records if not r.get("reference")}
    for record, key in zip(records, keys):
        why = runner.settings_differences(key, expected)
        if not record.get("reference") and record["name"] != "base":
            parents = record.get("parents", [previous])
            built_from = _stale_parents(dirs[record["name"]], [dirs[p] for p in parents if p in dirs], stale)
            why += built_from
            previous = record["name"]
            if built_from:
                stale.add(record["name"])
        if why:  # the eval.json relative to the run dir (a stage row's folder is relative to stages/)
            folder = Path(record["folder"]) if record.get("reference") else Path("stages") / record["folder"]
            out.append({"name": record["name"], "eval": str(folder / "eval.json"), "why": why})
    return out


def _stale_parents(stage_dir: Path, parent_dirs: list[Path], stale: set[str]) -> list[str]:
    """One phrase per parent stage (its folder) that is stale itself or finished after the stage in
    `stage_dir` (DONE's `finished`, ISO to the second: within one run a child finishes after its parent)."""
    newer = {parent: (then, finished) for parent, then, finished in finished_after(stage_dir, parent_dirs)}
    out = []
    for parent in (d.name.split("_", 1)[1] for d in parent_dirs):
        if parent in stale:
            out.append(f"built from `{parent}`, which is left out as built from an earlier version itself")
        elif parent in newer:
            then, finished = newer[parent]
            out.append(f"built from an earlier `{parent}` (that stage reran, finishing at {then}, after this one "
                       f"finished at {finished})")
    return out


def finished_after(stage_dir: Path, parent_dirs: list[Path]) -> list[tuple[str, str, str]]:
    """(parent stage, its finished time, this stage's) for each parent folder whose DONE is newer than the DONE
    in `stage_dir`: the stage was built from an earlier version of that parent (the report and `posttrain push`
    both refuse such a stage)."""
    mine = stage_finished(stage_dir)
    out = []
    for parent_dir in parent_dirs:
        then = stage_finished(parent_dir)
        if mine and then and then > mine:
            out.append((parent_dir.name.split("_", 1)[1], then, mine))
    return out


def stage_finished(stage_dir: Path) -> str | None:
    """The `finished` time (ISO, seconds) in a stage folder's DONE; None without a readable one."""
    try:
        return json.loads((stage_dir / "DONE").read_text()).get("finished")
    except (OSError, ValueError):
        return None
