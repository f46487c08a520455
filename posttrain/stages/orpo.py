"""Odds Ratio Preference Optimization on TRL's ORPOTrainer, full or LoRA, with `trainable:` (HFT) applied.

ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv 2403.07691)
folds preference alignment into SFT: the loss is the NLL of the chosen answer minus lambda * log sigmoid(log
odds(y_w|x) - log odds(y_l|x)), with odds(y|x) = P(y|x) / (1 - P(y|x)) and P the length-averaged likelihood
(the paper's Eq. 4-7). There is no reference model, so ORPO can start from a base model instead of an SFT one.
TRL (trl.experimental.orpo) owns that loss; its `beta` is the paper's lambda. How this stage fills the gaps:

* **Rows are preference pairs** as in DPO (posttrain/stages/preference.py): plain strings become chat when the
  tokenizer has a chat template; conversational rows need one.
* **No reference model** is loaded, full or LoRA.

Defaults are TRL 1.16's ORPOConfig values for real models (AdamW, lr 1e-6, beta 0.1: the paper's lambda for
its Mistral runs); the world's tuned values are stated in configs/stages/orpo.yaml.
"""
from __future__ import annotations

from typing import ClassVar

import warnings

from pydantic import Field

from posttrain.data import DataSource
from posttrain.mixture import Replayable
from posttrain.stages.base import StageContext, StageResult, stage
from posttrain.stages.common import TrainableStage, TrainerConfig
from posttrain.stages.preference import preference_inputs
from posttrain.stages.trl_run import run_trl_stage


def _trl_trainer() -> TrainerConfig:
    return TrainerConfig(learning_rate=1e-6)  # TRL 1.16's ORPOConfig; max_length 1024 is TrainerConfig's (TRL's too)


class ORPOStageConfig(Replayable, TrainableStage):
    """ORPO on preference pairs: SFT on the chosen answer plus an odds-ratio term against the rejected one."""
    # TRL's experimental ORPOTrainer maps the data with num_proc, which IterableDataset.map does not take
    no_stream: ClassVar[str] = "TRL's ORPOTrainer cannot prepare an IterableDataset"

    data: list[DataSource] = Field(default_factory=lambda: [DataSource(source="style")], min_length=1)
    trainer: TrainerConfig = Field(default_factory=_trl_trainer)
    beta: float = Field(0.1, gt=0, description="weight of the odds-ratio term (the paper's lambda)")

    def data_sources(self) -> list[tuple[DataSource, str]]:
        return [(src, "preference") for src in self.data]


@stage("orpo", ORPOStageConfig)
def run(cfg: ORPOStageConfig, ctx: StageContext) -> StageResult:
    """Odds Ratio Preference Optimization with TRL's ORPOTrainer (full, LoRA, or HFT-selected parameters)."""
    tokenizer, seed, dataset, data_stats = preference_inputs(cfg, ctx)  # pairs and `replay:` pairs
    with warnings.catch_warnings():  # TRL warns that trl.experimental may change; pyproject pins TRL
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # after the data check: importing TRL takes seconds

    return run_trl_stage(
        cfg, ctx, (ORPOConfig, ORPOTrainer), dataset, data_stats, tokenizer,
        args=dict(beta=cfg.beta, trust_remote_code=cfg.trust_remote_code, dataset_num_proc=None),
    )
