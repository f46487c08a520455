"""GRPO with verifiable rewards (RLVR) on TRL's GRPOTrainer, full or LoRA, with `trainable:` (HFT) applied.

GRPO is from DeepSeekMath (Shao et al. 2024, arXiv 2402.03300): sample `num_generations` completions per
prompt, score each with programs (here `rewards:`, see posttrain/rewards), use the reward minus the group's
mean (divided by its std) as every token's advantage, and take a clipped policy-gradient step (`epsilon`,
as in PPO) with an optional KL penalty to the input model (`beta`). TRL owns the loss and the loop; its
`loss_type` picks how token losses are averaged (`dapo`, TRL's default, averages over all tokens of the
batch, removing the original's length bias; `grpo` is the paper's per-sequence mean).

How this stage departs from, or adds to, the paper and TRL:
  * Prompts become chat messages (`[{"role": "user", "content": prompt}]`), so the model's chat template
    is applied as it was in SFT; completions reach builtin rewards as text, and every other data column
    (`answer`, `tests`) reaches rewards as a keyword argument, as TRL passes them.
  * A reward never stops training: a crash, timeout or bad return value scores 0 and is counted; the counts
    (`rewards/errors/<kind>` and `rewards/errors/<reward>/<kind>`) go into every record of metrics.jsonl.
  * Completions come from the backend `rollout:` picks (posttrain/rollout.py). With `vllm_server` and no
    `url`, the stage starts `vllm serve` itself (the command TRL builds for server mode) and stops it when it
    ends, fails or is interrupted.
  * The default input is `world-sft`, not the previous stage: RL needs a model that already answers in the
    task's format. In a pipeline, chain it explicitly (`model: ${stages.<previous>.model}`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.data import DataSource, load_dataset_rows
from posttrain.models import load_model, load_tokenizer
from posttrain.rewards import RewardSpec, RewardStats, build_reward_funcs
from posttrain.rollout import (
    SERVER_ENV,
    RolloutConfig,
    VLLMServer,
    free_port,
    grpo_rollout_args,
    resolve_backend,
    server_callback,
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


def _world_trainer() -> TrainerConfig:
    # Tuned on the world's SFT model (~1M parameters, 2 CPUs, ~2-3 min): 64 completions a step = 8 prompts x 8
    # samples. At 2e-4 the policy collapsed (reward and greedy accuracy fell); 5e-5, constant, no KL, lifted
    # both. Fewer prompts a step (4) made the reward curve too noisy to show the gain within 60 steps.
    return TrainerConfig(
        learning_rate=5e-5, max_steps=60, per_device_train_batch_size=64, warmup_steps=0,
        lr_scheduler_type="constant", logging_steps=2, save_steps=50, max_length=None,
    )


class GRPOStageConfig(TrainableStage):
    kind: str = Field("grpo", pattern="^grpo$")
    model: str | None = Field("world-sft", description="input model; in a pipeline, ${stages.<name>.model} "
                                                       "to start from an earlier stage")
    data: list[DataSource] = Field(default_factory=lambda: [DataSource(source="verifiable")], min_length=1)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="numeric_match")], min_length=1)
    trainer: TrainerConfig = Field(default_factory=_world_trainer)
    num_generations: int = Field(8, ge=2, description="completions per prompt (the group)")
    beta: float = Field(0.0, ge=0, description="KL penalty to the input model (0: no reference model loaded)")
    loss_type: LOSS_TYPES = "dapo"
    epsilon: float = Field(0.2, gt=0, description="clip range of the probability ratio")
    max_completion_length: int = Field(8, ge=1, description="tokens per completion")
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


def _as_chat(prompt: Any) -> list[dict[str, str]]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


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
    from trl import GRPOConfig, GRPOTrainer

    stats = RewardStats()
    reward_funcs, weights = build_reward_funcs(cfg.rewards, stats)
    dataset, data_stats = load_dataset_rows(cfg.data, "prompt", ctx.log)
    dataset = dataset.map(lambda row: {"prompt": _as_chat(row["prompt"])})
    backend = resolve_backend(cfg.rollout)
    start_server = backend == "vllm_server" and not cfg.rollout.url
    port = (cfg.rollout.port or free_port()) if start_server else None
    base_url = f"http://127.0.0.1:{port}" if start_server else cfg.rollout.url
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
        **grpo_rollout_args(cfg.rollout, backend, base_url),
    )
    tokenizer = load_tokenizer(ctx.input_model, cfg.trust_remote_code)
    model = load_model(ctx.input_model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    model, peft_config, trainable = select_parameters(model, cfg, ctx)
    ctx.log_metrics({"event": "data", "sources": data_stats, "trained_params": trainable["trained"],
                     "rollout": backend, "rewards": [f.__name__ for f in reward_funcs]})
    callbacks = [reward_errors_callback(stats), metrics_callback(ctx)]
    with contextlib.ExitStack() as stack:
        if start_server:
            server = stack.enter_context(VLLMServer(
                vllm_serve_command(ctx.input_model, cfg.rollout, port, cfg.trust_remote_code), port,
                ctx.work_dir / "vllm_server.log", env=_server_env(cfg.rollout.gpus),
                health_timeout_s=cfg.rollout.health_timeout_s, log=ctx.log))
            callbacks.append(server_callback(server))
            ctx.log_metrics({"event": "rollout_server", "pid": server.pid, "url": server.base_url,
                             "log": str(server.log_path)})
        trainer = GRPOTrainer(
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
    return StageResult(ctx.work_dir / "model", metrics)


def _server_env(gpus: list[int]) -> dict[str, str]:
    return {**SERVER_ENV, **({"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else {})}
