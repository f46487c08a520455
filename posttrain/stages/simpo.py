"""Simple Preference Optimization on TRL's CPOTrainer (`loss_type: simpo`), full or LoRA, with `trainable:` (HFT).

SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv
2405.14734) scores an answer by its length-averaged log-likelihood, r(x, y) = beta / |y| * log pi(y|x), and
trains on pairs with -log sigmoid(r(x, y_w) - r(x, y_l) - gamma): a Bradley-Terry loss with a target margin
gamma and no reference model. TRL implements it in its CPO trainer (trl.experimental.cpo, `loss_type:
"simpo"`), whose `simpo_gamma` is gamma and whose `cpo_alpha` adds CPO's NLL term on the chosen answer.
How this stage departs from TRL's spelling:

* **gamma_beta_ratio, not gamma.** As the SimPO authors' code does since their v2 update, the margin is set as
  gamma / beta (`gamma_beta_ratio`), which keeps its meaning when beta changes; TRL gets gamma = ratio * beta.
* **No NLL term by default** (`cpo_alpha: 0`): plain SimPO. TRL's CPOConfig defaults to CPO's 1.0; a positive
  value is the CPO-SimPO combination (the SimPO README's "adding an extra sft loss").
* **Rows are preference pairs** as in DPO (posttrain/stages/preference.py), and no reference model is loaded.

Defaults are the SimPO authors' for real models: beta 2.0 and gamma_beta_ratio 0.5 (their README's starting
point; their Llama-3-Base run), TRL's learning rate 1e-6 (within their recommended 3e-7..1e-6 grid) and AdamW;
the world's tuned values are stated in configs/stages/simpo.yaml.
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
    return TrainerConfig(learning_rate=1e-6)  # TRL 1.16's CPOConfig; max_length 1024 is TrainerConfig's (TRL's too)


class SimPOStageConfig(Replayable, TrainableStage):
    """SimPO on preference pairs: length-normalised likelihood margins, no reference model."""
    # TRL's experimental CPOTrainer maps the data with num_proc, which IterableDataset.map does not take
    no_stream: ClassVar[str] = "TRL's CPOTrainer cannot prepare an IterableDataset"

    data: list[DataSource] = Field(default_factory=lambda: [DataSource(source="style")], min_length=1)
    trainer: TrainerConfig = Field(default_factory=_trl_trainer)
    beta: float = Field(2.0, gt=0, description="scale of the length-averaged log-likelihood reward")
    gamma_beta_ratio: float = Field(0.5, ge=0, description="target reward margin gamma, as a share of beta")
    cpo_alpha: float = Field(0.0, ge=0, description="weight of an NLL term on the chosen answer (CPO); 0: none")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="share of pairs taken as mislabelled (cDPO)")

    def data_sources(self) -> list[tuple[DataSource, str]]:
        return [(src, "preference") for src in self.data]


@stage("simpo", SimPOStageConfig)
def run(cfg: SimPOStageConfig, ctx: StageContext) -> StageResult:
    """Simple Preference Optimization with TRL's CPOTrainer (full, LoRA, or HFT-selected parameters)."""
    tokenizer, seed, dataset, data_stats = preference_inputs(cfg, ctx)  # pairs and `replay:` pairs
    with warnings.catch_warnings():  # TRL warns that trl.experimental may change; pyproject pins TRL
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig, CPOTrainer  # after the data check: importing TRL takes seconds

    gamma = cfg.gamma_beta_ratio * cfg.beta
    return run_trl_stage(
        cfg, ctx, (CPOConfig, CPOTrainer), dataset, data_stats, tokenizer,
        args=dict(loss_type="simpo", beta=cfg.beta, simpo_gamma=gamma, cpo_alpha=cfg.cpo_alpha,
                  label_smoothing=cfg.label_smoothing, trust_remote_code=cfg.trust_remote_code,
                  dataset_num_proc=None),
        log={"simpo_gamma": gamma},
    )
