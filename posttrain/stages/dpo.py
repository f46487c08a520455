"""Direct Preference Optimization on TRL's DPOTrainer, full or LoRA, with `trainable:` (HFT) applied.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
arXiv 2305.18290) trains the policy on (prompt, chosen, rejected) pairs with the loss
-log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]); TRL owns that
loss and its variants (`loss_type`, TRL's names). How this stage departs from, or fills gaps in, TRL 1.16:

* **Reference = the stage's input model.** Full fine-tuning (HFT included) loads a second, frozen copy of the
  input folder; with LoRA there is no copy: the reference is the adapter-disabled model (`ref_model=None`).
* **RPO.** `rpo_alpha` (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv 2404.19733:
  DPO plus an NLL term on the chosen answer) is TRL 1.16's `loss_type: [..., "sft"]` with weight `rpo_alpha`;
  we append that term so a config can keep the older, shorter spelling. Off by default, as in TRL; the world's
  DPO configs set 0.5 (docs/notes/dpo_world_tuning.md says why).
* **max_prompt_length.** TRL 1.16 dropped it; we restore the pre-1.0 meaning: after TRL tokenizes, a prompt
  longer than this keeps its last `max_prompt_length` tokens (the end of the prompt is next to the answer).
* **Plain strings become chat** when the tokenizer has a chat template (posttrain/stages/preference.py).
* **Rehearsal pairs** (`rehearsal:`, empty by default; `make stage=dpo` sets the world's arithmetic): a
  prompt/answer task mixed in as (answer, answer +- 1) pairs, so a skill the pairs never show does not drift
  (`near_miss_pairs`).
* **Replay** (`replay:`, posttrain/mixture.py): a share of an earlier DPO or KTO stage's pairs mixed in.

Defaults are TRL 1.16's DPOConfig values for real models (AdamW, lr 1e-6, beta 0.1, sigmoid loss, no extra
term). The world's tuning (SGD, RPO, rehearsal) and what was tried: docs/notes/dpo_world_tuning.md.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from posttrain.data import DataSource
from posttrain.mixture import Replayable
from posttrain.registry import did_you_mean
from posttrain.stages.base import StageContext, StageResult, stage
from posttrain.stages.common import TrainableStage, TrainerConfig
from posttrain.stages.preference import near_miss_pairs, preference_inputs, prompt_cutter
from posttrain.stages.trl_run import run_trl_stage

# TRL 1.16's DPOConfig.loss_type values. Importing TRL takes seconds, too slow for config validation (which
# `posttrain list` and every YAML load run), so they are mirrored here; tests/test_dpo.py checks the mirror
# against the list TRL documents on the field, so an upgrade that changes it fails a test, not a run.
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def _trl_trainer() -> TrainerConfig:
    return TrainerConfig(learning_rate=1e-6)  # TRL 1.16's DPOConfig; max_length 1024 is TrainerConfig's (TRL's too)


class DPOStageConfig(Replayable, TrainableStage):
    """DPO (or a TRL variant) on preference pairs."""
    no_stream: ClassVar[str] = ""  # a streamed source trains from an IterableDataset (posttrain.data_stream)

    data: list[DataSource] = Field(default_factory=lambda: [DataSource(source="style")], min_length=1)
    trainer: TrainerConfig = Field(default_factory=_trl_trainer)
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"], min_length=1, description="TRL loss names")
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference (IPO: tau)")
    rpo_alpha: float | None = Field(None, gt=0, description="weight of an NLL term on the chosen answer (RPO)")
    loss_weights: list[float] | None = Field(None, description="one weight per loss_type (default 1.0 each)")
    max_prompt_length: int | None = Field(None, ge=1, description="keep the last N prompt tokens; None: all")
    rehearsal: list[DataSource] = Field(default_factory=list, description="prompt/answer tasks with integer "
                                        "answers mixed in as (answer, answer +-1) pairs")

    @field_validator("loss_type")
    @classmethod
    def _known_losses(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in TRL_LOSS_TYPES:
                raise ValueError(f"unknown loss_type {name!r}{did_you_mean(name, TRL_LOSS_TYPES)}; "
                                 f"TRL's: {', '.join(TRL_LOSS_TYPES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"loss_type lists a loss twice: {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DPOStageConfig":
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} weights for {len(self.loss_type)} "
                             "loss_type entries")
        if "sft" in self.loss_type and self.rpo_alpha is not None and "rpo_alpha" in self.model_fields_set:
            raise ValueError("rpo_alpha adds the 'sft' loss itself; drop 'sft' from loss_type or unset rpo_alpha")
        max_length = self.trainer.max_length
        if self.max_prompt_length is not None and max_length is not None and self.max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below trainer.max_length "
                             f"({max_length}), or no answer token is left")
        return self

    def trl_losses(self) -> tuple[list[str], list[float]]:
        """TRL's (loss_type, loss_weights), with RPO's NLL term appended when rpo_alpha is set.

        A loss_type that names 'sft' itself keeps its own weight (rpo_alpha then adds nothing).
        """
        types = list(self.loss_type)
        weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(types)
        if self.rpo_alpha is not None and "sft" not in types:
            types.append("sft")
            weights.append(self.rpo_alpha)
        return types, weights

    def data_sources(self) -> list[tuple[DataSource, str]]:
        return [(src, "preference") for src in self.data] + [(src, "prompt") for src in self.rehearsal]


@stage("dpo", DPOStageConfig)
def run(cfg: DPOStageConfig, ctx: StageContext) -> StageResult:
    """Direct Preference Optimization with TRL's DPOTrainer (full, LoRA, or HFT-selected parameters)."""
    rehearsal = near_miss_pairs(cfg.rehearsal, ctx.log)  # mixed in beside the `replay:` pairs
    tokenizer, seed, dataset, data_stats = preference_inputs(cfg, ctx, rehearsal)
    from trl import DPOConfig, DPOTrainer  # after the data check: importing TRL takes seconds

    loss_type, loss_weights = cfg.trl_losses()
    return run_trl_stage(
        cfg, ctx, (DPOConfig, DPOTrainer), dataset, data_stats, tokenizer, reference=True,
        prepare=prompt_cutter(cfg.max_prompt_length, ctx.log),
        args=dict(loss_type=loss_type, loss_weights=loss_weights, beta=cfg.beta,
                  trust_remote_code=cfg.trust_remote_code, dataset_num_proc=None),
        log={"loss_type": loss_type, "loss_weights": loss_weights},
    )
