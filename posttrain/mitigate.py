"""`eval.on_drop: mitigate`: a stage that broke `eval.max_drop` is replaced by the interpolation with its parent
that keeps the most of it while meeting the limits on the dev splits.

θ(α) = parent + α·(stage − parent) (WiSE-FT, Wortsman et al. 2022) is task arithmetic with the parent as base and
weight α, so it streams through the merge code (posttrain.merging, tensor slice by slice). Each α of
`eval.mitigate_alphas` is written and scored on the dev splits; evals.mitigation judges them with the gate's rule
and keeps the largest that passes (the test split never chooses). The stage folder then holds::

    model/                  θ(α) kept: the stage's output, hashed by DONE (`mitigated` says how it was made)
    unmitigated/model/      the trained model; unmitigated/eval.json its test scores (a reference row)
    mitigation.json         the settings, every α's dev scores and figures, the kept α

mitigation.json and DONE's `mitigated` are written last: a folder without both is a mitigation cut short,
undone by `reconcile` on the next run. A rerun with the same grid, limits and dev eval settings reuses the
mitigation; other settings undo it (the trained model comes back, DONE is rewritten for it, so later stages
rerun) and the gate runs again. Libraries checked first: mergekit and peft interpolate two models, but neither
searches α against an eval gate.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from evals import runner  # through the module: tests replace evaluate_model
from evals.config import EvalConfig
from evals.mitigation import MITIGATION_FILE, best_tradeoff, choose, describe, trial
from evals.run_report import unmitigated_record
from posttrain.merging.compat import check_compatible
from posttrain.merging.search import Coefficients
from posttrain.merging.stream import MergePlan, write_merge
from posttrain.registry import MERGE_METHODS
from posttrain.rundir import RunDir, atomic_write_json
from posttrain.tensors import MergeMismatch, ShardedReader


class MitigationFailed(RuntimeError):
    """No α met the limits (or the stage cannot be interpolated); one line, the best trade-off named."""


def settings_key(ev: EvalConfig) -> dict[str, Any]:
    """What a mitigation depends on besides the two models: the grid, the limits, the dev evals' settings."""
    return {"alphas": list(ev.mitigate_alphas), "max_drop": dict(ev.max_drop),
            "eval": runner.current_eval_settings(ev, split="dev")}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def reconcile(final: Path, ev: EvalConfig, log: Callable[[str], None]) -> None:
    """Before the stage's DONE is checked: keep a complete mitigation made under the current settings, undo
    any other (settings changed, on_drop no longer mitigate, cut short), restoring the trained model and its DONE."""
    kept = final / "unmitigated" / "model"
    if not kept.is_dir():
        return
    m, done = _read(final / MITIGATION_FILE), _read(final / "DONE")
    if ev.on_drop == "mitigate" and m.get("settings") == settings_key(ev) and done.get("mitigated") \
            and (final / "model").is_dir():
        return
    why = "cut short" if not (m and done.get("mitigated")) else "other settings" if ev.on_drop == "mitigate" \
        else "on_drop is no longer mitigate"
    log(f"[{final.name.replace('_', ' ', 1)}] undoing its mitigation ({why}): the trained model is the output again")
    (final / MITIGATION_FILE).unlink(missing_ok=True)
    shutil.rmtree(final / "model", ignore_errors=True)
    os.replace(kept, final / "model")
    shutil.rmtree(final / "unmitigated", ignore_errors=True)
    shutil.rmtree(final / "mitigation", ignore_errors=True)
    if done.get("config_sha256"):
        RunDir.write_done(final, done["config_sha256"], done["inputs_sha256"],
                          {k: done[k] for k in ("seconds", "metrics") if k in done})


def _plan(parent: Path, stage_model: Path) -> MergePlan:
    import torch

    readers = [ShardedReader(parent), ShardedReader(stage_model)]
    try:
        check_compatible(readers)
    except MergeMismatch as e:
        for r in readers:
            r.close()
        raise MitigationFailed(f"cannot interpolate with the parent {parent}: {e}") from None
    return MergePlan(method="task_arithmetic", fn=MERGE_METHODS.get("task_arithmetic"), params={},
                     dtype=torch.float32, seed=0, max_shard_bytes=5_000_000_000, ref=readers[0], base=readers[0],
                     models=[readers[1]], files_from=stage_model)


def search(pipe: Any, final: Path, parent: str, trains_on: list[str]) -> dict[str, Any]:
    """Write and score on dev the stage (α = 1) and θ(α) for each α of the grid; the mitigation record."""
    ev: EvalConfig = pipe.settings
    trials_dir = final / "mitigation"
    shutil.rmtree(trials_dir, ignore_errors=True)  # a search cut short (kill -9) left its trials: start afresh
    trials_dir.mkdir()

    def dev(model: Path | str, name: str) -> dict:
        return runner.evaluate_model(str(model), settings=ev, split="dev", out=trials_dir / f"{name}.dev.json",
                                     log=pipe.log)["scores"]

    base_dev, parent_dev = dev(pipe.records[0]["model"], "base"), dev(parent, "parent")
    judge = lambda a, scores: trial(a, scores, base_dev, parent_dev, ev.max_drop, trains_on)  # noqa: E731
    trials = [{**judge(1.0, dev(final / "model", "stage")), "stage": True}]
    plan = _plan(Path(parent), final / "model")
    try:
        for alpha in ev.mitigate_alphas:
            out = trials_dir / f"alpha_{alpha:g}"
            write_merge(plan, Coefficients([alpha]), out)
            trials.append(judge(alpha, dev(out, f"alpha_{alpha:g}")))
            pipe.log(f"  mitigate: {describe(trials[-1])}{'' if trials[-1]['ok'] else ' (breaks the gate)'}")
    finally:
        plan.close()
    kept = choose(trials)
    return {"settings": settings_key(ev), "alphas": list(ev.mitigate_alphas), "max_drop": dict(ev.max_drop),
            "parent": str(parent), "base_dev": base_dev, "parent_dev": parent_dev, "trials": trials,
            "chosen": None if kept is None else kept["alpha"]}


def mitigate(pipe: Any, final: Path, parent: str | None, trains_on: list[str], messages: list[str]) -> dict:
    """Search α, keep the chosen θ(α) as the stage's model/ and return the new DONE; MitigationFailed when the
    stage has no parent to interpolate with or no α passes (the trained model stays the output)."""
    label = final.name.replace("_", " ", 1)
    if not parent:
        raise MitigationFailed(f"eval gate: {messages[0]}; on_drop: mitigate interpolates with the stage's input "
                               "model, and this stage reads none")
    pipe.log(f"[{label}] eval gate: {messages[0]}; mitigating: θ(α) = parent + α·(stage − parent) for "
             f"α in {', '.join(f'{a:g}' for a in pipe.settings.mitigate_alphas)}, scored on the dev splits")
    record = search(pipe, final, parent, trains_on)
    if record["chosen"] is None:
        best = best_tradeoff(record["trials"])
        shutil.rmtree(final / "mitigation", ignore_errors=True)
        raise MitigationFailed(f"eval gate: {messages[0]}; no interpolation with the parent meets the limits on the "
                               f"dev splits" + (f"; best trade-off {describe(best)}" if best else ""))
    alpha = record["chosen"]
    unmitigated = final / "unmitigated"
    unmitigated.mkdir(exist_ok=True)
    os.replace(final / "model", unmitigated / "model")
    if (final / "eval.json").is_file():
        result = _read(final / "eval.json")
        atomic_write_json(unmitigated / "eval.json", {**result, "model": str(unmitigated / "model")})
    os.replace(final / "mitigation" / f"alpha_{alpha:g}", final / "model")
    done = _read(final / "DONE")
    done = RunDir.write_done(final, done["config_sha256"], done["inputs_sha256"], {
        **{k: done[k] for k in ("seconds", "metrics") if k in done},
        "mitigated": {"method": "interpolate", "alpha": alpha, "parent": str(parent)}})
    atomic_write_json(final / MITIGATION_FILE, record)
    shutil.rmtree(final / "mitigation", ignore_errors=True)
    pipe.log(f"[{label}] mitigated: interpolate α={alpha:g} (the trained model is kept in {unmitigated / 'model'})")
    return done


def unmitigated_row(pipe: Any, final: Path, name: str) -> dict:
    """The `<stage>:unmitigated` reference row: the trained model's test scores (evaluated when missing)."""
    model = final / "unmitigated" / "model"
    result = runner.evaluate_model(str(model), settings=pipe.settings, out=final / "unmitigated" / "eval.json",
                                   log=pipe.log)
    return unmitigated_record(name, final.name, result)
