"""Plumbing the trainable stages (sft, dpo, grpo) share around TRL's trainers.

Nothing here trains: TRL's trainers own the loss and the loop. This module turns our strict config into
TRL's config, decides which parameters train (HFT), writes metrics, stops on a non-finite loss, resumes from
the work folder's last checkpoint, and saves the HF folder (merging LoRA adapters when asked).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import Field, field_validator, model_validator

from posttrain.schema import ConfigError, Strict
from posttrain.hft import TrainableConfig, frozen_slices
from posttrain.models import cast_saved_weights, fit_cpu_threads, save_model_folder, saved_dtype
from posttrain.progress import progress_line, quiet_trainer, verbose
from posttrain.ranks import is_main
from posttrain.registry import did_you_mean
from posttrain.rundir import atomic_write_text
from posttrain.stages.base import StageBase, StageContext
from posttrain.tracking import check_report_to
from posttrain.stages.selection import LoraSpec, lora_adapters, select_parameters  # noqa: F401 (the stages import them here)


class TrainerConfig(Strict):
    """The knobs every TRL trainer shares; anything else of TRL's config goes in `extra` (checked by name).

    Defaults are TRL 1.16's for real models (transformers' TrainingArguments with the overrides TRL's SFT, DPO
    and GRPO configs share: AdamW, linear decay, gradient checkpointing on); each stage kind sets its method's
    learning rate. Deliberate departures (`save_total_limit`, `seed`) are listed with their reasons in
    tests/test_defaults.py. The embedded world trains with its own block (posttrain/world/tuning.py).
    """

    learning_rate: float = Field(5e-5, gt=0)
    max_steps: int = Field(-1, description="-1: train num_train_epochs")
    num_train_epochs: float = Field(3.0, gt=0)
    per_device_train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler_type: str = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1, description="checkpoint every N steps (a rerun resumes from the last)")
    save_total_limit: int = Field(2, ge=1)
    max_length: int | None = Field(1024, ge=8, description="tokens per row (truncated); None: no limit")
    gradient_checkpointing: bool = True
    bf16: bool | None = Field(None, description="None: bf16 on a GPU that supports it, float32 on CPU")
    seed: int | None = Field(None, description="None: the pipeline's seed")
    extra: dict[str, Any] = Field(default_factory=dict, description="more fields of TRL's config, passed as-is")


class TrainableStage(StageBase):
    """Fields every training stage has on top of StageBase."""

    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    lora: LoraSpec | None = None
    trainable: TrainableConfig = Field(default_factory=TrainableConfig)
    report_to: list[str] | str | None = Field(None, description="trackers for this stage; None: the pipeline's")

    # Why this kind cannot train on a `streaming: true` source (posttrain.data_stream), refused at load; "" where
    # it can (sft, dpo).
    no_stream: ClassVar[str] = "posttrain builds its rows in memory (sft and dpo stream)"

    def training_data(self) -> list[Any]:
        return list(self.data)  # every trainable kind declares `data:`, with its own default and row shape

    def seed_in(self, ctx: Any) -> int:
        """The stage's seed: `trainer.seed` when set, else the pipeline's."""
        return ctx.seed if self.trainer.seed is None else self.trainer.seed

    @model_validator(mode="after")
    def _stream_needs_max_steps(self) -> "TrainableStage":
        """A stage whose data streams gets an IterableDataset, which has no length: the kind must take one, and
        TRL's trainers then need `max_steps` (they cannot count epochs)."""
        streams = [i for i, src in enumerate(self.training_data()) if getattr(src, "streaming", False)]
        if not streams:
            return self
        if self.no_stream:
            raise ValueError(f"data[{streams[0]}].streaming: the {self.kind} kind cannot train on a stream "
                             f"({self.no_stream}); drop streaming: true")
        if self.trainer.max_steps <= 0:
            raise ValueError(f"trainer.max_steps: data[{streams[0]}] streams, and a stream has no length to count "
                             "epochs in; set trainer.max_steps to a number of steps")
        return self

    @field_validator("trainer", mode="before")
    @classmethod
    def _over_stage_defaults(cls, v: Any) -> Any:
        """A partial `trainer:` (YAML or --set) overrides the stage kind's defaults field by field.

        Without this, `trainer: {max_steps: 60}` would silently fall back to TrainerConfig's generic defaults
        (learning rate, batch size, ...) for every field it does not name. `extra` merges key by key too.
        """
        if not isinstance(v, dict):
            return v
        default = cls.model_fields["trainer"].default_factory().model_dump()
        return {**default, **v, "extra": {**default["extra"], **(v.get("extra") or {})}}

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v: Any) -> Any:
        return None if v is None else check_report_to(v)

    @field_validator("trainer")
    @classmethod
    def _no_reserved_extra(cls, v: TrainerConfig) -> TrainerConfig:
        reserved = {"output_dir", "report_to", "run_name", "resume_from_checkpoint"} & set(v.extra)
        if reserved:
            key = sorted(reserved)[0]
            hint = " (set `report_to:` on the stage or the pipeline)" if key in ("report_to", "run_name") else ""
            raise ValueError(f"trainer.extra.{key} is set by posttrain and cannot be overridden{hint}")
        return v


def trl_args(config_cls: type, stage: TrainableStage, ctx: StageContext, **kind_specific: Any):
    """Build TRL's config dataclass; unknown `extra` names fail with a did-you-mean before any model loads."""
    import torch

    t = stage.trainer
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in t.extra:
        if key not in fields:
            raise ConfigError(f"trainer.extra.{key}: not a field of {config_cls.__name__}{did_you_mean(key, fields)}")
    cuda = torch.cuda.is_available()
    bf16 = t.bf16 if t.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    kwargs: dict[str, Any] = dict(
        output_dir=str(ctx.work_dir / "checkpoints"),
        learning_rate=t.learning_rate,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5 renamed it (the old name warns)
        bf16=bf16,
        seed=t.seed if t.seed is not None else ctx.seed,
        report_to=list(ctx.report_to),  # resolved by the pipeline: the stage's, else the pipeline's
        run_name=ctx.run_name or None,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        # Log NaN/inf losses as they are (transformers would average them away) so the stage can stop on them.
        logging_nan_inf_filter=False,
    )
    if "max_length" in fields:
        kwargs["max_length"] = t.max_length
    kwargs.update(kind_specific)
    kwargs.update(t.extra)
    return config_cls(**kwargs)


class NonFiniteLoss(RuntimeError):
    pass


def metrics_callback(ctx: StageContext):
    """A TrainerCallback that appends every log record to metrics.jsonl, prints a progress line at every tenth
    of the steps (not with `--verbose`, where the trainer prints its own; see quiet_trainer) and stops on a
    NaN/inf loss."""
    import time

    from transformers import TrainerCallback

    # Fault injection for the reliability tests: SIGKILL ourselves after step N, exactly like `kill -9`.
    # With POSTTRAIN_FAULT_MID_ACCUMULATION=1 the kill lands after a micro-batch of step N+1 instead, halfway
    # through a gradient accumulation.
    # POSTTRAIN_FAULT_KILL_STAGE=<name> limits the kill to that stage of a pipeline (the others train through).
    crash_at = int(os.environ.get("POSTTRAIN_FAULT_KILL_AT_STEP", "0"))
    only = os.environ.get("POSTTRAIN_FAULT_KILL_STAGE")
    if only and not ctx.run_name.endswith(f"/{only}"):
        crash_at = 0
    mid_accum = os.environ.get("POSTTRAIN_FAULT_MID_ACCUMULATION") == "1"

    class _Metrics(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if crash_at and not mid_accum and state.global_step == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_substep_end(self, args, state, control, **kw):
            if crash_at and mid_accum and state.global_step == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_begin(self, args, state, control, **kw):
            self.start = self.finite = state.global_step  # a checkpoint resumed from was good when saved
            self.began, self.tenth = time.monotonic(), 10 * state.global_step // max(state.max_steps, 1)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            ctx.log_metrics({"step": state.global_step, "epoch": state.epoch, **logs})
            self._progress(state, logs)
            loss = logs.get("loss")
            if not isinstance(loss, (int, float)):
                return
            if math.isfinite(loss):
                self.finite = state.global_step
                return
            # The weights saved at the last finite-loss step already produced the non-finite window: drop that
            # checkpoint and later ones, so a rerun resumes from weights that trained sanely.
            folder = ctx.work_dir / "checkpoints"
            kept = drop_checkpoints_from(folder, self.finite if self.finite > self.start else self.start + 1)
            where = f"the last good checkpoint, {kept}, is kept in {folder}" if kept else (
                f"no checkpoint from before it is left in {folder}")
            raise NonFiniteLoss(f"loss became {loss} at step {state.global_step}; {where} "
                                f"(lower trainer.learning_rate or check the data)")

        def _progress(self, state, logs):
            tenth = 10 * state.global_step // max(state.max_steps, 1)
            if verbose() or not (tenth > self.tenth or "train_runtime" in logs):
                return
            self.tenth = tenth
            ctx.log(progress_line(logs, state.global_step, state.max_steps, time.monotonic() - self.began,
                                  state.global_step - self.start))

    return _Metrics()


def drop_records_after(path: Path, step: int) -> int:
    """Remove the training records of steps after `step` from metrics.jsonl (training resumed from that
    checkpoint logs them again; kept, a loss curve would double back) and a line a kill cut short. Returns how
    many lines went. Records without a step (events) stay."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step \
                and record.get("event") is None:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def checkpoints(folder: Path) -> dict[int, Path]:
    """The trainer's `checkpoint-N` folders by step N."""
    return {int(p.name[11:]): p for p in folder.glob("checkpoint-*") if p.name[11:].isdigit()}


def drop_checkpoints_from(folder: Path, step: int) -> str | None:
    """Delete checkpoint-N folders with N >= step; return the name of the newest one left (None if none)."""
    left = []
    for n, path in checkpoints(folder).items():
        if n >= step:
            shutil.rmtree(path, ignore_errors=True)
        else:
            left.append(n)
    return f"checkpoint-{max(left)}" if left else None


def last_checkpoint(ctx: StageContext) -> str | None:
    """The newest complete checkpoint: transformers writes trainer_state.json last, so a checkpoint folder
    without it was cut short (kill -9, full disk) and is skipped. (transformers' get_last_checkpoint takes the
    highest number whatever its state.)"""
    done = {n: p for n, p in checkpoints(ctx.work_dir / "checkpoints").items() if (p / "trainer_state.json").is_file()}
    return str(done[max(done)]) if done else None


def train_and_save(trainer: Any, tokenizer: Any, ctx: StageContext, lora: bool,
                   unquantized: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run trainer.train (resuming when a checkpoint exists), then write model/ (merged if LoRA).

    model/ is written in the dtype the input's weights are stored in (`saved_dtype`), whatever dtype trained
    (float32 on CPU, bf16 on a bf16 GPU): a fine-tune must match its base tensor by tensor for the merge and
    transfer stages, which refuse a dtype difference. Values that did not train (HFT's frozen half) come back
    bit-identical, because bf16 -> float32 -> bf16 is exact. A hub model not cached, or a folder whose dtype
    cannot be read, is written as trained.

    Under `accelerate launch` every rank trains and calls this; only the main process writes. With FSDP or
    DeepSpeed the weights live in shards, so every rank takes part in trainer.save_model, which gathers them.
    Once saved, the trainer lets go of its model, optimizer and vLLM engine (`_release_trainer`).
    """

    fit_cpu_threads(sum(p.numel() for p in trainer.model.parameters()))
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if sharded and lora:
        raise ConfigError("LoRA under FSDP/DeepSpeed: the adapter cannot be merged from shards; use DDP for LoRA")
    guard = frozen_slices(trainer.model)  # HFT's partly trained tensors (fused projections, experts)
    if guard and sharded:
        raise ConfigError("trainable: hft splits fused or expert tensors, which FSDP/DeepSpeed shard flat; use DDP")
    if guard:
        trainer.add_callback(guard.callback())  # restores the frozen parts after every optimizer step
    resume = last_checkpoint(ctx)
    if resume:
        ctx.log(f"resuming from {resume}")
        if is_main():
            step = int(Path(resume).name.removeprefix("checkpoint-"))
            drop_records_after(ctx.metrics_path, step)
            ctx.log_metrics({"event": "resume", "step": step, "checkpoint": str(resume)})
    elif is_main() and drop_records_after(ctx.metrics_path, 0):  # an attempt that failed after training
        ctx.log_metrics({"event": "restart"})
    quiet_trainer(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    dtype = saved_dtype(ctx.input_model)
    if sharded:
        _save_gathered(trainer, tokenizer, ctx.work_dir / "model", dtype)
    elif is_main():
        if lora:
            model.save_pretrained(ctx.work_dir / "adapter")
            model = model.merge_and_unload() if unquantized is None else _merged_unquantized(ctx, unquantized)
        _set_generation_ids(model, tokenizer)
        save_model_folder(model, tokenizer, ctx.work_dir / "model", dtype)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics["global_step"] = result.global_step
    if is_main():
        shutil.rmtree(ctx.work_dir / "checkpoints", ignore_errors=True)  # the model folder supersedes them
        (ctx.work_dir / "train_result.json").write_text(json.dumps(metrics, indent=2) + "\n")
    del model
    _release_trainer(trainer)
    return metrics


def _merged_unquantized(ctx: StageContext, unquantized: Callable[[], Any]) -> Any:
    """A QLoRA adapter merged into the input model loaded again unquantized: merged into the 4/8-bit weights it
    trained on, the update would be rounded to the quantization grid and model/ would be a bitsandbytes model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(unquantized(), ctx.work_dir / "adapter").merge_and_unload()


def _release_trainer(trainer: Any) -> None:
    """Drop the trainer's references to what it holds on the GPU (the stage still holds the trainer) and return
    PyTorch's cached memory: a vLLM eval next starts only when its share of the GPU is free.

    accelerate's `free_memory` (checked first) drops the accelerator's references (prepared models, optimizers,
    schedulers, a DeepSpeed engine), then runs gc.collect and torch.cuda.empty_cache; the attributes cleared here
    are transformers' and TRL's (reference model, GRPO's colocated vLLM engine, its vLLM server client, whose
    NCCL group TRL closes only at exit). The stage's own model object sits in reference cycles: it goes when the
    eval runner collects garbage, after the stage returned (evals/runner.py)."""
    import atexit

    client = getattr(getattr(trainer, "vllm_generation", None), "vllm_client", None)
    if client is not None:
        client.close_communicator()
        atexit.unregister(client.close_communicator)  # TRL registered it; it would keep the client alive
    handler = getattr(trainer, "callback_handler", None)
    for owner, names in ((trainer, ("model", "model_wrapped", "ref_model", "optimizer", "lr_scheduler",
                                    "vllm_generation")),
                         (handler, ("model", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader"))):
        for name in names:
            if getattr(owner, name, None) is not None:
                setattr(owner, name, None)
    trainer.accelerator.free_memory()


def _save_gathered(trainer: Any, tokenizer: Any, out: Path, dtype: str | None) -> None:
    """FSDP / DeepSpeed: trainer.save_model gathers the full weights (a collective: every rank calls it) and
    writes them on the main process (FULL_STATE_DICT, zero3_save_16bit_model in configs/accelerate/). They are
    written in the dtype they trained in, so the files are cast to the input's `dtype` afterwards."""

    _set_generation_ids(trainer.model, tokenizer)
    trainer.save_model(str(out))
    if is_main():
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; model folders hold safetensors only
        if dtype is not None:
            cast_saved_weights(out, dtype)
        tokenizer.save_pretrained(out)
        if getattr(trainer.model, "generation_config", None) is not None:  # a reward model has none
            trainer.model.generation_config.save_pretrained(out)


def _set_generation_ids(model: Any, tokenizer: Any) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is None:  # a model that does not generate (the reward stage's sequence classifier)
        return
    gen.eos_token_id = eos_ids(tokenizer.eos_token_id, gen.eos_token_id)
    gen.pad_token_id = tokenizer.pad_token_id


def eos_ids(tokenizer_eos: int | None, listed: int | list[int] | None) -> int | list[int] | None:
    """The generation config's stop ids: the tokenizer's eos first, then the other ids the input listed.

    Instruct models list several (end-of-turn and end-of-text: Qwen2.5-Instruct, Llama-3-Instruct); keeping
    only the tokenizer's would let generation run past the others. One id stays a plain int, as HF writes it.
    """
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    ids = list(dict.fromkeys(([tokenizer_eos] if tokenizer_eos is not None else []) + listed))
    return ids[0] if len(ids) == 1 else (ids or None)


def optimizer_param_names(trainer: Any) -> set[str]:
    """Names of the parameters in the trainer's optimizer groups (HFT: frozen ones get no optimizer state)."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"] if id(p) in names}
