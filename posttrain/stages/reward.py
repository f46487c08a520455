"""Reward modelling on TRL's RewardTrainer, full or LoRA, with `trainable:` (HFT) applied.

A reward model is the input language model with its LM head replaced by a one-output score head (transformers'
`AutoModelForSequenceClassification`, `num_labels: 1`), trained on preference pairs with the Bradley-Terry loss
-log sigmoid(r(x, y_w) - r(x, y_l)) (Ouyang et al. 2022, "Training language models to follow instructions with
human feedback", arXiv 2203.02155, Eq. 1; Stiennon et al. 2020). TRL owns that loss and its optional
`center_rewards_coefficient` term (Eisenstein et al. 2023, arXiv 2312.09244: an auxiliary loss that pulls the
rewards towards mean 0). How this stage fills the gaps around it:

* **Its model/ is a sequence classifier**, not a causal LM: the `reward_model` reward scores with it in grpo
  and rloo (`rewards: [{name: reward_model, params: {model: ${stages.<this stage>.model}}}]`). The pipeline
  runs no generation evals on it (`generates()` is False: the training log's `accuracy` and `margin` say how
  it ranks the pairs), and a stage that would train or evaluate it as a language model is refused when the
  config loads (its `model:` must name another stage or model).
* **The new score head is seeded** with the stage's seed before it is drawn, so a rerun (and a resumed run)
  starts from the same head; with LoRA it trains whole beside the adapters (peft's SEQ_CLS task).
* **Rows are preference pairs** as in DPO (posttrain/stages/preference.py); a pair longer than
  `trainer.max_length` is dropped by TRL (counted in the data event as `dropped_long`).

Defaults are TRL 1.16's RewardConfig values for real models (AdamW, lr 1e-4, no centring term); the world's
tuned values are stated in configs/stages/reward.yaml.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from posttrain.data import DataSource
from posttrain.mixture import Replayable
from posttrain.stages.base import StageContext, StageResult, stage
from posttrain.stages.common import TrainableStage, TrainerConfig
from posttrain.stages.preference import preference_inputs
from posttrain.stages.trl_run import run_trl_stage


def _trl_trainer() -> TrainerConfig:
    return TrainerConfig(learning_rate=1e-4)  # TRL 1.16's RewardConfig; max_length 1024 is TrainerConfig's (TRL's too)


class RewardStageConfig(Replayable, TrainableStage):
    """A reward model (one-output sequence classifier) trained on preference pairs."""
    no_stream: ClassVar[str] = "it counts the pairs TRL drops against the dataset's length"

    data: list[DataSource] = Field(default_factory=lambda: [DataSource(source="style")], min_length=1)
    trainer: TrainerConfig = Field(default_factory=_trl_trainer)
    center_rewards_coefficient: float | None = Field(None, gt=0, description="weight of a term pulling the "
                                                     "rewards towards mean 0 (None: none)")

    def data_sources(self) -> list[tuple[DataSource, str]]:
        return [(src, "preference") for src in self.data]

    def generates(self) -> bool:
        return False


@stage("reward", RewardStageConfig)
def run(cfg: RewardStageConfig, ctx: StageContext) -> StageResult:
    """A reward model trained on preference pairs with TRL's RewardTrainer (full, LoRA, or HFT-selected)."""
    tokenizer, seed, dataset, data_stats = preference_inputs(cfg, ctx)  # pairs and `replay:` pairs
    from trl import RewardConfig, RewardTrainer  # after the data check: importing TRL takes seconds

    def count_dropped(trainer) -> None:
        dropped = len(dataset) - len(trainer.train_dataset)
        if dropped:
            ctx.log(f"reward: TRL dropped {dropped} pairs longer than trainer.max_length ({cfg.trainer.max_length})")
        ctx.log_metrics({"event": "data", "dropped_long": dropped})

    return run_trl_stage(
        cfg, ctx, (RewardConfig, RewardTrainer), dataset, data_stats, tokenizer, scorer=True, prepare=count_dropped,
        args=dict(center_rewards_coefficient=cfg.center_rewards_coefficient, trust_remote_code=cfg.trust_remote_code,
                  dataset_num_proc=None),
    )
