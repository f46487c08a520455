"""GRPO with verifiable rewards (RLVR) on TRL's GRPOTrainer, full or LoRA, with `trainable:` (HFT) applied.

GRPO is from DeepSeekMath (Shao et al. 2024, arXiv 2402.03300): sample `num_generations` completions per
prompt, score each with programs (here `rewards:`, see posttrain/rewards), use the reward minus the group's
mean (divided by its std) as every token's advantage, and take a clipped policy-gradient step (`epsilon`,
as in PPO) with an optional KL penalty to the input model (`beta`). TRL owns the loss and the loop; its
`loss_type` picks how token losses are averaged (`dapo`, TRL's default, averages over all tokens of the
batch, removing the original's length bias; `grpo` is the paper's per-sequence mean).

How this stage departs from, or adds to, the paper and TRL:
  * Prompts become chat messages (`[{"role": "user", "content": prompt}]`) when the tokenizer has a chat
    template, so it is applied as it was in SFT; without one (a GPT-2-style base) plain prompts stay plain
    and conversational ones are refused before the model loads. Completions reach builtin rewards as text,
    and every other data column (`answer`, `tests`) reaches rewards as a keyword argument, as TRL passes them.
  * Epoch k's prompt order is a function of (seed, k) only (`epoch_sampler`), so a run resumed past its first
    epoch matches an uninterrupted one; TRL's sampler orders epoch k by how many epochs it has produced.
  * A reward never stops training: a crash, timeout or bad return value scores 0 and is counted; the counts
    (`rewards/errors/<kind>` and `rewards/errors/<reward>/<kind>`) go into every record of metrics.jsonl.
    At the end, a reward that failed on every completion is named in a warning and in the stage's metrics
    (`rewards/failed_every_call`); when every reward did, the stage fails (`failed_rewards`).
  * Completions come from the backend `rollout:` picks (posttrain/rollout.py). With `vllm_server` and no
    `url`, the stage's main process starts `vllm serve` on `gpus` (the command TRL builds for server mode) and
    stops it when the stage ends, fails or is interrupted.
  * The default input is `world-sft`, not the previous stage: RL needs a model that already answers in the
    task's format. In a pipeline, chain it explicitly (`model: ${stages.<previous>.model}`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.data import DataError, DataSource, load_sources, rows_dataset
from posttrain.models import load_model, load_tokenizer
from posttrain.ranks import agree, is_main
from posttrain.rewards import RewardsFailed, RewardSpec, RewardStats, build_reward_funcs, reward_file
from posttrain.rollout import (
    RolloutConfig,
    VLLMServer,
    free_port,
    grpo_rollout_args,
    resolve_backend,
    server_callback,
    server_env,
    vllm_serve_command,
)
from posttrain.stages.base import StageContext, StageResult, stage
from posttrain.stages.common import (
    TrainableStage,
    TrainerConfig,
    metrics_callback,
    select_parameters,
    train_and_save,
    trl_args,
)

LOSS_TYPES = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


def _trl_trainer() -> TrainerConfig:
    # TRL 1.16's GRPOConfig. GRPOConfig has no max_length: completions stop at max_completion_length and
    # prompts are not cut, so the field is left unset here rather than shown with a value that does nothing.
    return TrainerConfig(learning_rate=1e-6, max_length=None)


class GRPOStageConfig(TrainableStage):
    kind: str = Field("grpo", pattern="^grpo$")
    model: str | None = Field("world-sft", description="input model; in a pipeline, ${stages.<name>.model} "
                                                       "to start from an earlier stage")
    data: list[DataSource] = Field(default_factory=lambda: [DataSource(source="verifiable")], min_length=1)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="numeric_match")], min_length=1)
    trainer: TrainerConfig = Field(default_factory=_trl_trainer)
    num_generations: int = Field(8, ge=2, description="completions per prompt (the group)")
    beta: float = Field(0.0, ge=0, description="KL penalty to the input model (0: no reference model loaded)")
    loss_type: LOSS_TYPES = "dapo"
    epsilon: float = Field(0.2, gt=0, description="clip range of the probability ratio")
    max_completion_length: int = Field(512, ge=1, description="tokens per completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)

    @model_validator(mode="after")
    def _groups_fit(self) -> "GRPOStageConfig":
        t = self.trainer
        batch = t.per_device_train_batch_size * t.gradient_accumulation_steps
        if batch % self.num_generations:
            raise ValueError(
                f"trainer.per_device_train_batch_size x gradient_accumulation_steps ({batch}) counts completions "
                f"and must be a multiple of num_generations ({self.num_generations})")
        return self

    def data_sources(self) -> list[tuple[DataSource, str]]:
        return [(src, "prompt") for src in self.data]

    def input_files(self) -> list[str]:
        """The user rewards' .py files and every other .py file in their folders (not in subfolders), sorted,
        so that editing a reward or a helper module next to it reruns the stage. That is more than a reward
        imports (an unrelated .py there reruns it too), but misses no import however it is written. Not
        followed: a package (subfolder) next to a reward, importable in-process, and folders a reward adds to
        sys.path itself; after editing those, rename the reward file (or its function) to force a rerun."""
        files = {f for f in (reward_file(r.name) for r in self.rewards) if f is not None}
        return sorted(files | {str(p) for f in files for p in Path(f).parent.glob("*.py") if p.is_file()})


def _as_chat(prompt: Any) -> list[dict[str, str]]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_rows(rows: list[dict], chat: bool) -> list[dict]:
    """Prompt rows as TRL's GRPOTrainer takes them: all chat (the tokenizer has a template) or all plain text.

    Without a template TRL tokenizes plain prompts as they are, but a message list has nothing to render it,
    so such rows are refused (DataError: exit 2), as the DPO stage refuses conversational pairs.
    """
    if chat:
        return [{**r, "prompt": _as_chat(r["prompt"])} for r in rows]
    if any(isinstance(r["prompt"], list) for r in rows):
        raise DataError("conversational prompts need a tokenizer with a chat template; this one has none")
    return rows


def prompt_dataset(sources: list[DataSource], chat: bool, log) -> tuple[Any, list[dict]]:
    """Checked prompt rows of every source as one `datasets.Dataset`, plus per-source stats.

    Rows are normalised by `prompt_rows` before the Dataset is built, since one Arrow column cannot hold both
    strings and message lists (a plain source mixed with a conversational one).
    """
    rows, stats = load_sources(sources, "prompt", log)
    return rows_dataset(prompt_rows(rows, chat)), stats


def epoch_sampler(**repeat_sampler_kwargs: Any):
    """TRL's RepeatSampler whose order in epoch k is a function of (seed, k) only, so a resumed run repeats it.

    TRL 1.16's RepeatSampler seeds its generator once and draws a permutation on every `__iter__`, so epoch k's
    order depends on how many epochs the same object produced; a resumed trainer builds a fresh sampler and gave
    epoch 2 epoch 1's order. Checked first: transformers' Trainer calls `set_epoch(epoch)` on the train
    dataloader before every epoch, the resumed one included, and accelerate's DataLoaderShard forwards it to the
    sampler (also through skip_first_batches' SkipBatchSampler), so reseeding there is enough. Like torch's
    DistributedSampler we seed with seed + epoch, which keeps epoch 0 (every one-epoch run) as TRL orders it.
    """
    from trl.trainer.utils import RepeatSampler

    class _EpochSampler(RepeatSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            if self.shuffle and self.seed is not None:  # reseed in place: accelerate may hold this generator
                self.generator.manual_seed(self.seed + self.epoch)
            return super().__iter__()

    return _EpochSampler(**repeat_sampler_kwargs)


def _trainer_class():
    """GRPOTrainer with `epoch_sampler` as its train sampler (only the sampler's seeding changes)."""
    from trl import GRPOTrainer

    class _GRPOTrainer(GRPOTrainer):
        def _get_train_sampler(self, dataset=None):
            # TRL's sampler first, so its batch arithmetic (prompts per generation batch, repeats per
            # num_iterations x steps_per_generation) stays TRL's; only the class changes.
            s = super()._get_train_sampler(dataset)
            return epoch_sampler(data_source=s.data_source, mini_repeat_count=s.mini_repeat_count,
                                 batch_size=s.batch_size, repeat_count=s.repeat_count, shuffle=s.shuffle,
                                 seed=s.seed)

    return _GRPOTrainer


def reward_errors_callback(stats: RewardStats):
    """A TrainerCallback that adds the reward error counts to each log record (before metrics_callback)."""
    from transformers import TrainerCallback

    class _RewardErrors(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs is not None:
                logs.update(stats.as_metrics())  # the same dict reaches the callbacks after this one

    return _RewardErrors()


@stage("grpo", GRPOStageConfig)
def run(cfg: GRPOStageConfig, ctx: StageContext) -> StageResult:
    """GRPO with verifiable rewards on TRL's GRPOTrainer (full, LoRA, or HFT-selected parameters)."""
    stats = RewardStats()
    reward_funcs, weights = build_reward_funcs(cfg.rewards, stats)
    tokenizer = load_tokenizer(ctx.input_model, cfg.trust_remote_code)
    dataset, data_stats = prompt_dataset(cfg.data, bool(tokenizer.chat_template), ctx.log)
    from trl import GRPOConfig  # after the data check: importing TRL takes seconds

    backend = resolve_backend(cfg.rollout)
    serve = backend == "vllm_server" and not cfg.rollout.url
    env = server_env(cfg.rollout.gpus) if serve else None  # a bad gpus index fails on every rank, before loading
    # The main process's ports on every rank; it alone starts the server and talks to it (TRL's server mode).
    port, group_port = agree(((cfg.rollout.port or free_port()) if serve else None,
                              (cfg.rollout.group_port or free_port("")) if backend == "vllm_server" else None))
    base_url = f"http://127.0.0.1:{port}" if serve else cfg.rollout.url
    start_server = serve and is_main()
    args = trl_args(
        GRPOConfig, cfg, ctx,
        num_generations=cfg.num_generations,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        epsilon=cfg.epsilon,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        reward_weights=weights,
        trust_remote_code=cfg.trust_remote_code,
        **grpo_rollout_args(cfg.rollout, backend, base_url, group_port),
    )
    model = load_model(ctx.input_model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    model, peft_config, trainable = select_parameters(model, cfg, ctx)
    ctx.log_metrics({"event": "data", "sources": data_stats, "trained_params": trainable["trained"],
                     "rollout": backend, "rewards": [f.__name__ for f in reward_funcs]})
    callbacks = [reward_errors_callback(stats), metrics_callback(ctx)]
    with contextlib.ExitStack() as stack:
        if start_server:
            server = stack.enter_context(VLLMServer(
                vllm_serve_command(ctx.input_model, cfg.rollout, port, cfg.trust_remote_code), port,
                ctx.work_dir / "vllm_server.log", env=env,
                health_timeout_s=cfg.rollout.health_timeout_s, log=ctx.log))
            callbacks.append(server_callback(server))
            ctx.log_metrics({"event": "rollout_server", "pid": server.pid, "url": server.base_url,
                             "log": str(server.log_path)})
        trainer = _trainer_class()(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        metrics = train_and_save(trainer, tokenizer, ctx, lora=peft_config is not None)
    metrics.update(stats.as_metrics())
    metrics["bad_rows"] = sum(s["bad_rows"] for s in data_stats)
    metrics["rewards/failed_every_call"] = failed_rewards(stats, [f.__name__ for f in reward_funcs], ctx.log)
    return StageResult(ctx.work_dir / "model", metrics)


def failed_rewards(stats: RewardStats, names: list[str], log) -> list[str]:
    """The rewards (of ``names``, in order) that failed on every completion of the run, each warned about;
    raise RewardsFailed when that is all of them.

    Why fail only then: a reward error scores 0 so that one bad batch does not cost a run, and a reward that
    never scored gave the policy no signal, but the others still trained it as configured minus that term:
    the model is a result (named as incomplete in DONE's metrics and the log). With no reward left, every
    group's rewards were equal, every advantage 0, and the run trained on nothing (beta > 0 only pulled it
    to its input). Reporting that as done would be a lie, and later stages would build on it. The stage
    fails before DONE: its work folder keeps the model and metrics.jsonl, a rerun with the same config
    trains again, and fixing the reward file changes the stage's inputs, so the rerun starts afresh.

    Each process counts its own calls (TRL scores each rank's completions where they were generated), so
    the main process's view is taken by every rank: they fail together or not at all (none waits forever).
    """
    failed = agree(stats.failed_every_call())
    for name in (n for n in names if n in failed):
        kinds = ", ".join(f"{k}: {n}" for k, n in failed[name].items())
        log(f"warning: reward {name!r} failed on every completion of this run ({kinds}); it scored none, so it "
            f"gave the training no signal")
    if names and all(n in failed for n in names):
        raise RewardsFailed(
            f"every reward failed on every completion ({', '.join(map(repr, names))}): the run trained on no "
            f"reward signal, so the stage is not marked done; fix the reward and rerun")
    return [n for n in names if n in failed]
