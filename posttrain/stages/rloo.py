"""REINFORCE Leave-One-Out on TRL's RLOOTrainer, full or LoRA, with `trainable:` (HFT) applied.

RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs", arXiv 2402.14740; the baseline is Kool et al. 2019's "Buy 4 REINFORCE samples, get a
baseline for free") samples `num_generations` completions per prompt and gives completion i the advantage
r_i - mean(r_j, j != i): its reward minus the mean of the others of its group, with no learned value model
and, unlike GRPO, no division by the group's std. TRL 1.16 folds the KL to the input model into the reward
(`beta`, as the paper does) and clips the probability ratio as PPO (`epsilon`) when a batch is reused.

Everything around the trainer is GRPO's (posttrain/stages/grpo_support.py, see posttrain/stages/grpo.py): the
same rewards registry (`rewards:`; a `reward_model` reward scores with a `reward` stage's output), the same
rollout backends (`rollout:`: transformers, vLLM colocated, or a vLLM server the stage starts), prompt rows,
the resume-safe epoch order, reward error counts, and the default input `world-sft` (RL needs a model that
already answers in the task's format; chain it with `model: ${stages.<previous>.model}`).

Defaults are TRL 1.16's RLOOConfig values for real models (AdamW, lr 1e-6, 2 generations, beta 0.05, 512
completion tokens); the world's tuned values are stated in configs/stages/rloo.yaml.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from posttrain.data import DataSource
from posttrain.mixture import Replayable
from posttrain.models import load_tokenizer
from posttrain.rewards import RewardSpec, RewardStats
from posttrain.rollout import RolloutConfig
from posttrain.stages.base import StageContext, StageResult, stage
from posttrain.stages.common import TrainableStage, TrainerConfig
from posttrain.stages.grpo import GRPOStageConfig
from posttrain.stages.grpo_support import (
    check_reward_columns,
    failed_rewards,
    group_problem,
    prompt_dataset,
    reward_errors_callback,
    reward_funcs,
    rollout_session,
    trainer_class,
)
from posttrain.stages.replay import replay_rows
from posttrain.stages.trl_run import run_trl_stage


def _trl_trainer() -> TrainerConfig:
    # TRL 1.16's RLOOConfig; like GRPOConfig it has no max_length (completions stop at max_completion_length).
    return TrainerConfig(learning_rate=1e-6, max_length=None)


class RLOOStageConfig(Replayable, TrainableStage):
    # TRL takes a stream, but epoch_sampler (its RepeatSampler, reseeded per epoch) draws from the length
    no_stream: ClassVar[str] = "its prompt sampler draws from the dataset's length"
    model: str | None = Field("world-sft", description="input model; in a pipeline, ${stages.<name>.model} "
                                                       "to start from an earlier stage")
    data: list[DataSource] = Field(default_factory=lambda: [DataSource(source="verifiable")], min_length=1)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="numeric_match")], min_length=1)
    trainer: TrainerConfig = Field(default_factory=_trl_trainer)
    num_generations: int = Field(2, ge=2, description="completions per prompt (each one's baseline is the others)")
    beta: float = Field(0.05, ge=0, description="KL penalty to the input model, folded into the reward "
                                                "(0: no reference model loaded)")
    epsilon: float = Field(0.2, gt=0, description="clip range of the probability ratio")
    max_completion_length: int = Field(512, ge=1, description="tokens per completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    normalize_advantages: bool = Field(False, description="scale the advantages of a batch to mean 0, std 1")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)

    @model_validator(mode="after")
    def _groups_fit(self) -> "RLOOStageConfig":
        problem = group_problem(self.trainer, self.num_generations)
        if problem:
            raise ValueError(problem)
        return self

    def data_sources(self) -> list[tuple[DataSource, str]]:
        return [(src, "prompt") for src in self.data]

    other_inputs = GRPOStageConfig.other_inputs  # the reward models' folders
    scorers = GRPOStageConfig.scorers
    input_files = GRPOStageConfig.input_files  # the user rewards' .py files and their neighbours


@stage("rloo", RLOOStageConfig)
def run(cfg: RLOOStageConfig, ctx: StageContext) -> StageResult:
    """REINFORCE Leave-One-Out on TRL's RLOOTrainer (full, LoRA, or HFT-selected parameters)."""
    stats = RewardStats()
    funcs, weights = reward_funcs(cfg, ctx, stats)
    seed = cfg.seed_in(ctx)
    tokenizer = load_tokenizer(ctx.input_model, cfg.trust_remote_code)
    replayed = replay_rows(cfg.replay, "prompt", ctx.log, seed)  # earlier stages' prompts (`replay:`)
    dataset, data_stats = prompt_dataset(cfg.data, bool(tokenizer.chat_template), ctx.log, seed, replayed)
    check_reward_columns(cfg.rewards, dataset.column_names)
    from trl import RLOOConfig, RLOOTrainer  # after the data check: importing TRL takes seconds

    backend, rollout_args, session = rollout_session(cfg, ctx)
    names = [f.__name__ for f in funcs]
    result = run_trl_stage(
        cfg, ctx, (RLOOConfig, trainer_class(RLOOTrainer)), dataset, data_stats, tokenizer,
        args=dict(num_generations=cfg.num_generations, beta=cfg.beta, epsilon=cfg.epsilon,
                  max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                  normalize_advantages=cfg.normalize_advantages, reward_weights=weights,
                  trust_remote_code=cfg.trust_remote_code, **rollout_args),
        trainer_kwargs={"reward_funcs": funcs}, callbacks=[reward_errors_callback(stats)],
        log={"rollout": backend, "rewards": names}, session=session,
    )
    result.metrics.update(stats.as_metrics())
    result.metrics["rewards/failed_every_call"] = failed_rewards(stats, names, ctx.log)
    return result
