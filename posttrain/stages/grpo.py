"""GRPO with verifiable rewards (RLVR) on TRL's GRPOTrainer, full or LoRA, with `trainable:` (HFT) applied.

GRPO is from DeepSeekMath (Shao et al. 2024, arXiv 2402.03300): sample `num_generations` completions per
prompt, score each with programs (here `rewards:`, see posttrain/rewards), use the reward minus the group's
mean (divided by its std) as every token's advantage, and take a clipped policy-gradient step (`epsilon`,
as in PPO) with an optional KL penalty to the input model (`beta`). TRL owns the loss and the loop; its
`loss_type` picks how token losses are averaged (`dapo`, TRL's default, averages over all tokens of the
batch, removing the original's length bias; `grpo` is the paper's per-sequence mean).

How this stage departs from, or adds to, the paper and TRL (the parts: posttrain/stages/grpo_support.py):
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
  * `replay:` (posttrain/mixture.py) mixes in a share of an earlier GRPO stage's prompts, scored by this
    stage's rewards (a column only the earlier prompts have reaches them; one they lack is None).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.data import DataSource
from posttrain.mixture import Replayable
from posttrain.models import load_tokenizer
from posttrain.rewards import RewardSpec, RewardStats, reward_file, reward_models
from posttrain.rollout import RolloutConfig
from posttrain.stages.base import StageContext, StageResult, stage
from posttrain.stages.common import TrainableStage, TrainerConfig
from posttrain.stages.grpo_support import (
    check_reward_columns,
    failed_rewards,
    prompt_dataset,
    reward_errors_callback,
    reward_funcs,
    rollout_session,
    trainer_class,
)
from posttrain.stages.replay import replay_rows
from posttrain.stages.trl_run import run_trl_stage

LOSS_TYPES = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


def _trl_trainer() -> TrainerConfig:
    # TRL 1.16's GRPOConfig. GRPOConfig has no max_length: completions stop at max_completion_length and
    # prompts are not cut, so the field is left unset here rather than shown with a value that does nothing.
    return TrainerConfig(learning_rate=1e-6, max_length=None)


class GRPOStageConfig(Replayable, TrainableStage):
    # TRL takes a stream, but epoch_sampler (its RepeatSampler, reseeded per epoch) draws from the length
    no_stream: ClassVar[str] = "its prompt sampler draws from the dataset's length"
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

    def other_inputs(self) -> list[str]:
        return self.scorers()  # a reward_model's folder: hashed into the inputs, checked before use

    def scorers(self) -> list[str]:
        return reward_models(self.rewards)

    def input_files(self) -> list[str]:
        """The user rewards' .py files and every other .py file in their folders (not in subfolders), sorted,
        so that editing a reward or a helper module next to it reruns the stage. That is more than a reward
        imports (an unrelated .py there reruns it too), but misses no import however it is written. Not
        followed: a package (subfolder) next to a reward, importable in-process, and folders a reward adds to
        sys.path itself; after editing those, rename the reward file (or its function) to force a rerun."""
        files = {f for f in (reward_file(r.name) for r in self.rewards) if f is not None}
        return sorted(files | {str(p) for f in files for p in Path(f).parent.glob("*.py") if p.is_file()})


@stage("grpo", GRPOStageConfig)
def run(cfg: GRPOStageConfig, ctx: StageContext) -> StageResult:
    """GRPO with verifiable rewards on TRL's GRPOTrainer (full, LoRA, or HFT-selected parameters)."""
    stats = RewardStats()
    funcs, weights = reward_funcs(cfg, ctx, stats)
    seed = cfg.seed_in(ctx)
    tokenizer = load_tokenizer(ctx.input_model, cfg.trust_remote_code)
    replayed = replay_rows(cfg.replay, "prompt", ctx.log, seed)
    dataset, data_stats = prompt_dataset(cfg.data, bool(tokenizer.chat_template), ctx.log, seed, replayed)
    check_reward_columns(cfg.rewards, dataset.column_names)
    from trl import GRPOConfig  # after the data check: importing TRL takes seconds

    backend, rollout_args, session = rollout_session(cfg, ctx)
    names = [f.__name__ for f in funcs]
    result = run_trl_stage(
        cfg, ctx, (GRPOConfig, trainer_class()), dataset, data_stats, tokenizer,
        args=dict(num_generations=cfg.num_generations, beta=cfg.beta, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
                  max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                  reward_weights=weights, trust_remote_code=cfg.trust_remote_code, **rollout_args),
        trainer_kwargs={"reward_funcs": funcs}, callbacks=[reward_errors_callback(stats)],
        log={"rollout": backend, "rewards": names}, session=session,
    )
    result.metrics.update(stats.as_metrics())
    result.metrics["rewards/failed_every_call"] = failed_rewards(stats, names, ctx.log)
    return result
