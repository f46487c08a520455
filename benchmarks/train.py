"""Training overhead: a `posttrain stage` (sft, dpo) against the plain TRL script (benchmarks/plain_trl.py) on the
same model, data, seed and TRL arguments.

Two ratios per stage, each the median over back-to-back pairs:
  * seconds per step: TRL's own train_runtime / global_step on both sides (the trainer loop only: posttrain's
    callbacks, HFT bookkeeping and metrics file are inside it; goal <= 1.03);
  * whole stage: wall seconds of the command, interpreter start, imports, data checks, model save, hashes and
    the DONE marker included (goal <= 1.10). Evals are off on the posttrain side; the raw script has none.
Before timing, the TRL config posttrain builds is compared field by field with the one the raw script builds,
so the figure compares like with like (the comparison lands in results.json). Every run goes through
common.measured, which also gives each side's peak RSS (in `detail`; a figure of its own with `rss=True`), and
its output folder (checkpoints included) is deleted once read.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import REPO, Figure, bench_env, measured, median, paired, python, ratio_figure

MODELS = {"sft": "world", "dpo": "world-sft"}
DATA = {"sft": "arithmetic", "dpo": "style"}
KIND_ARGS = {
    "sft": dict(assistant_only_loss=True, packing=False, dataset_num_proc=None),
    "dpo": dict(loss_type=["sigmoid"], loss_weights=[1.0], beta=0.1, trust_remote_code=False, dataset_num_proc=None),
}


def world_trainer(kind: str, steps: int) -> dict[str, Any]:
    """The world's trainer block for the stage kind (posttrain/world/tuning.py: read, never copied)."""
    from posttrain.world.tuning import world_trainer as tuned

    return tuned(kind, max_steps=steps)


def class_trainer(kind: str, steps: int, **fields: Any) -> dict[str, Any]:
    """The stage kind's own trainer defaults (a real user's: no `trainer:` block), with `fields` changed."""
    import posttrain.stages  # noqa: F401  (registers the kinds)
    from posttrain.registry import STAGES

    default = STAGES.get(kind).config.model_fields["trainer"].default_factory().model_dump()
    return {**default, "max_steps": steps, **fields}


def plain_args(kind: str, steps: int, trainer: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TRL config fields the raw script passes for that trainer block (the world's unless given), as a user
    would spell them out (posttrain.stages.common.trl_args makes the same translation; the bench checks that
    they agree)."""
    t = trainer or world_trainer(kind, steps)
    return dict(
        learning_rate=t["learning_rate"], max_steps=steps, num_train_epochs=t["num_train_epochs"],
        per_device_train_batch_size=t["per_device_train_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"], lr_scheduler_type=t["lr_scheduler_type"],
        warmup_steps=t["warmup_steps"], weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"],
        logging_steps=t["logging_steps"], save_strategy="steps", save_steps=t["save_steps"],
        save_total_limit=t["save_total_limit"], gradient_checkpointing=t["gradient_checkpointing"], bf16=False,
        seed=0, report_to=[], use_cpu=True, dataloader_num_workers=0, logging_nan_inf_filter=False,
        max_length=t["max_length"], **KIND_ARGS[kind], **t["extra"],
    )


def stage_yaml(kind: str, model_dir: str, steps: int, trainer: dict[str, Any] | None = None) -> dict[str, Any]:
    trainer = {k: v for k, v in (trainer or world_trainer(kind, steps)).items() if v is not None}
    return {"kind": kind, "model": model_dir, "data": [{"source": DATA[kind]}], "trainer": trainer}


def args_differences(kind: str, stage: dict[str, Any], plain: dict[str, Any], work: Path) -> list[str]:
    """Fields where posttrain's TRL config differs from the raw script's (output paths aside); [] = same."""
    import posttrain.stages  # noqa: F401  (registers the kinds)
    from posttrain.registry import STAGES
    from posttrain.stages.base import StageContext
    from posttrain.stages.common import trl_args
    from trl import DPOConfig, SFTConfig

    cls = SFTConfig if kind == "sft" else DPOConfig
    cfg = STAGES.get(kind).config.model_validate(stage)
    ctx = StageContext(run_dir=work, work_dir=work, index=1, seed=0, input_model=stage["model"], resolve=str)
    kind_args = dict(KIND_ARGS[kind])
    if kind == "dpo":  # the losses the stage itself passes (an rpo_alpha would add TRL's "sft" term)
        kind_args["loss_type"], kind_args["loss_weights"] = cfg.trl_losses()
    ours = trl_args(cls, cfg, ctx, **kind_args).to_dict()
    raw = cls(output_dir=str(work / "checkpoints"), **plain).to_dict()
    skip = {"output_dir", "logging_dir"}
    return sorted(k for k in ours.keys() | raw.keys() if k not in skip and ours.get(k) != raw.get(k))


def _setup(kind: str, steps: int, tmp: Path, model: str | None,
           trainer: dict[str, Any] | None) -> tuple[list[str], list[str], dict[str, Any]]:
    from posttrain.models import resolve_model
    from posttrain.world import task_file

    quiet = lambda m: None  # noqa: E731
    model_dir = model or resolve_model(MODELS[kind], quiet)
    data = str(task_file(DATA[kind], "train", quiet))
    stage, plain = stage_yaml(kind, model_dir, steps, trainer), plain_args(kind, steps, trainer)
    (tmp / "stage.yaml").write_text(yaml.safe_dump(stage))
    (tmp / "args.json").write_text(json.dumps(plain))
    ours = [python(), "-m", "posttrain", "stage", kind, "--config", str(tmp / "stage.yaml"),
            "--set", "eval.enabled=false", "--run-dir"]
    raw = [python(), str(REPO / "benchmarks" / "plain_trl.py"), kind, model_dir, data, str(tmp / "args.json")]
    return ours, raw, {"differences": args_differences(kind, stage, plain, tmp / "check"), "steps": steps}


def figures(kind: str, steps: int, runs: int, model: str | None = None, trainer: dict[str, Any] | None = None,
            label: str | None = None, rss: bool = False) -> list[Figure]:
    """The stage against plain TRL on the world's model and trainer block, or on `model` with `trainer`.
    `rss` adds the stage's peak RSS, against plain TRL's x 1.10."""
    env = bench_env()
    label = label or kind
    per_step: dict[str, list[float]] = {"ours": [], "raw": []}
    peak: dict[str, list[float]] = {"ours": [], "raw": []}
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as d:
        tmp = Path(d)
        ours_cmd, raw_cmd, detail = _setup(kind, steps, tmp, model, trainer)
        count = iter(range(10**6))

        def ours() -> float:
            run_dir = tmp / f"run{next(count)}"
            seconds, _, rss_mb = measured([*ours_cmd, str(run_dir)], env)
            result = json.loads(next(run_dir.glob("stages/01_*/train_result.json")).read_text())
            per_step["ours"].append(result["train_runtime"] / result["global_step"])
            peak["ours"].append(rss_mb)
            shutil.rmtree(run_dir)  # a real-size run leaves GBs (checkpoint with optimizer state)
            return seconds

        def raw() -> float:
            out = tmp / f"raw{next(count)}"
            seconds, stdout, rss_mb = measured([*raw_cmd, str(out)], env)
            result = json.loads(stdout.strip().splitlines()[-1])
            per_step["raw"].append(result["train_runtime"] / result["global_step"])
            peak["raw"].append(rss_mb)
            shutil.rmtree(out, ignore_errors=True)
            return seconds

        whole_ours, whole_raw = paired(ours, raw, runs)
    detail.update(peak_rss_mb=round(median(peak["ours"])), raw_peak_rss_mb=round(median(peak["raw"])))
    note = "" if not detail["differences"] else f"TRL args differ: {detail['differences']}"
    out = [
        ratio_figure(f"{label}: s/step vs plain TRL", per_step["ours"], per_step["raw"], 1.03, note, detail),
        ratio_figure(f"{label}: whole stage vs plain TRL", whole_ours, whole_raw, 1.10, note, detail),
    ]
    if rss:
        goal = 1.10 * median(peak["raw"])
        out.append(Figure(f"{label}: peak RSS (MB)", median(peak["ours"]), round(goal), "MB", peak["ours"],
                          f"goal: plain TRL's {median(peak['raw']):.0f} MB x 1.10", detail=dict(detail)))
    return out
