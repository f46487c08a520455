"""The one TRL run every trainable stage makes: config, model, parameters, trainer, train, save.

A stage kind reads and checks its data, imports its TRL pair (config class, trainer class) and hands both to
`run_trl_stage` with what is its own (TRL config fields, trainer arguments, a reference model or not). The
order is fixed here so that no stage loads a model before its config and data are known good:
TRL's config (unknown `trainer.extra` names fail) -> model -> `trainable:`/LoRA -> reference copy -> trainer
-> train (resuming from the last checkpoint) -> model/ (LoRA merged).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

from posttrain.models import load_model
from posttrain.stages.base import StageContext, StageResult
from posttrain.tracking import trainer_env
from posttrain.stages.common import TrainableStage, metrics_callback, select_parameters, train_and_save, trl_args
from posttrain.stages.selection import quantization_config


@contextlib.contextmanager
def _scorer_head(seed: int):
    """Seed the new score head of a reward model, and keep transformers from listing the input's LM head as
    unused and the score head as missing (TRL's own context for the same load)."""
    from transformers import set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    set_seed(seed)
    with suppress_seqcls_warning():
        yield


def run_trl_stage(
    cfg: TrainableStage,
    ctx: StageContext,
    trl: tuple[type, type],
    dataset: Any,
    data_stats: list[dict],
    tokenizer: Any,
    *,
    args: dict[str, Any] | None = None,
    reference: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
    log: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    session: Callable[[], ContextManager[list[Any]]] | None = None,
    prepare: Callable[[Any], None] | None = None,
    scorer: bool = False,
) -> StageResult:
    """Train `cfg` with TRL's (config class, trainer class) `trl` on `dataset`; write `ctx.work_dir/model`.

    args: the kind's fields of TRL's config (beside the shared `trainer:` ones, see `trl_args`).
    reference: load a frozen copy of the input as `ref_model` (DPO, KTO). With LoRA none is loaded: the
        reference is the adapter-disabled policy, so no second copy sits in memory.
    trainer_kwargs: more arguments of the trainer class (GRPO's `reward_funcs`).
    log: more fields of the "data" event in metrics.jsonl.
    callbacks: trainer callbacks that must see a log record before metrics.jsonl does.
    session: a context that stays open while the trainer is built and trains and yields more callbacks
        (GRPO's vLLM server).
    prepare: called with the built trainer before training (DPO cuts long prompts in its tokenized data).
    scorer: load the input as a one-output sequence classifier (the reward stage), its new score head drawn
        after seeding torch with the run's seed, as TRL's RewardTrainer does when it loads a model by name.
    """
    config_cls, trainer_cls = trl
    trl_config = trl_args(config_cls, cfg, ctx, **(args or {}))
    def load(quantized: bool = False):
        with _scorer_head(trl_config.seed) if scorer else contextlib.nullcontext():
            return load_model(ctx.input_model, trust_remote_code=cfg.trust_remote_code,
                              allow_pickle=cfg.allow_pickle, scorer=scorer,
                              quantization_config=quantization_config(cfg.lora) if quantized else None)

    model, peft_config, trainable = select_parameters(load(quantized=True), cfg, ctx)
    extra = dict(trainer_kwargs or {})
    if reference:
        ref_model = None
        if peft_config is None:
            ref_model = load()
            ref_model.requires_grad_(False)
        extra["ref_model"] = ref_model
    ctx.log_metrics({"event": "data", "sources": data_stats, "trained_params": trainable["trained"], **(log or {})})
    first = [*(callbacks or []), metrics_callback(ctx)]
    with (session or (lambda: contextlib.nullcontext([])))() as more, \
            trainer_env(ctx.report_to, ctx.work_dir, ctx.run_dir, ctx.run_name):
        trainer = trainer_cls(
            model=model,
            args=trl_config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=first + list(more),
            **extra,
        )
        if prepare is not None:
            prepare(trainer)
        quantized = cfg.lora is not None and cfg.lora.quantize is not None
        metrics = train_and_save(trainer, tokenizer, ctx, lora=peft_config is not None,
                                 unquantized=load if quantized else None)
    metrics["bad_rows"] = sum(s["bad_rows"] for s in data_stats)
    return StageResult(ctx.work_dir / "model", metrics)
