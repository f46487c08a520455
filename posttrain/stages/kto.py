"""Kahneman-Tversky Optimization on TRL's KTOTrainer, full or LoRA, with `trainable:` (HFT) applied.

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306)
learns from single completions labelled desirable or undesirable instead of pairs. With r = log pi(y|x) -
log ref(y|x) and z0 a batch estimate of KL(pi || ref) (the prompts paired with other rows' completions), a
desirable y costs 1 - sigmoid(beta * (r - z0)) and an undesirable one 1 - sigmoid(beta * (z0 - r)), weighted
by `desirable_weight` / `undesirable_weight`. TRL owns that loss (`loss_type`: `kto`, or APO's
`apo_zero_unpaired`). How this stage fills the gaps around it:

* **Rows** are KTO's own unpaired {prompt, completion, label: true|false} rows, or preference pairs (the
  world's `style` by default: chosen opens with "Certainly!") unpaired into them: chosen -> desirable, rejected
  -> undesirable (`unpaired_rows`); a source may hold either, and sources may mix. Plain strings become chat
  when the tokenizer has a chat template, as in DPO (posttrain/stages/preference.py).
* **Reference = the stage's input model**, as in DPO: a frozen copy, or with LoRA the adapter-disabled model.
* **Replay** (`replay:`, posttrain/mixture.py): a share of an earlier KTO or DPO stage's pairs, spread evenly
  among the stage's own (TRL reads KTO rows in order, see `unpaired_rows`) before they are unpaired.

Defaults are TRL 1.16's KTOConfig values for real models (AdamW, lr 1e-6, beta 0.1, weights 1.0); the world's
tuned values are stated in configs/stages/kto.yaml.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.data import DataSource, load_sources
from posttrain.mixture import Replayable, spread
from posttrain.models import load_tokenizer
from posttrain.stages.base import StageContext, StageResult, stage
from posttrain.stages.common import TrainableStage, TrainerConfig
from posttrain.stages.preference import as_chat_or_text
from posttrain.stages.replay import replay_rows
from posttrain.stages.trl_run import run_trl_stage


def _trl_trainer() -> TrainerConfig:
    return TrainerConfig(learning_rate=1e-6)  # TRL 1.16's KTOConfig; max_length 1024 is TrainerConfig's (TRL's too)


class KTOStageConfig(Replayable, TrainableStage):
    """KTO (or TRL's unpaired APO-zero) on desirable and undesirable completions."""
    no_stream: ClassVar[str] = "it reorders all its rows so that every batch holds both labels"

    data: list[DataSource] = Field(default_factory=lambda: [DataSource(source="style")], min_length=1)
    trainer: TrainerConfig = Field(default_factory=_trl_trainer)
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference")
    desirable_weight: float = Field(1.0, gt=0, description="weight of the desirable rows' losses")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of the undesirable rows' losses")

    @model_validator(mode="after")
    def _kl_needs_neighbours(self) -> "KTOStageConfig":
        # TRL raises this only after the model has loaded: the KL estimate pairs each prompt with another row's
        # completion of the same device batch, so a batch of one has none.
        if self.loss_type == "kto" and self.trainer.per_device_train_batch_size < 2:
            raise ValueError("loss_type kto estimates its KL term within a batch: "
                             "trainer.per_device_train_batch_size must be at least 2")
        return self

    def data_sources(self) -> list[tuple[DataSource, str]]:
        return [(src, "kto") for src in self.data]


def unpaired_rows(pairs: list[dict]) -> list[dict]:
    """Prompt/chosen/rejected pairs as KTO rows {prompt, completion, label}, two per pair, in training order.

    TRL reads KTO rows in order (`train_sampling_strategy: sequential`) and estimates the KL term by giving
    each row of a batch its predecessor's completion. So the rows alternate labels (every batch holds both)
    and no row follows the other half of its own pair (that completion would be a match, not a mismatch):
    first pair i's chosen for even i and rejected for odd i, then the other half of every pair.
    """
    def half(flip: bool) -> list[dict]:
        return [{"prompt": p["prompt"], "completion": p["chosen" if (i % 2 == 0) != flip else "rejected"],
                 "label": (i % 2 == 0) != flip} for i, p in enumerate(pairs)]

    return half(False) + half(True)


def kto_order(rows: list[dict]) -> list[dict]:
    """A source's rows in the order TRL will read them: the pairs unpaired (`unpaired_rows`), and the unpaired
    rows with desirable and undesirable ones alternating (each in its order; the longer list's rest at the end),
    so that every batch holds both labels; the two kinds spread evenly among each other."""
    pairs = [r for r in rows if "chosen" in r]
    good = [r for r in rows if "chosen" not in r and r["label"]]
    bad = [r for r in rows if "chosen" not in r and not r["label"]]
    alternating = [r for i in range(max(len(good), len(bad))) for r in (good[i:i + 1] + bad[i:i + 1])]
    return spread(unpaired_rows(pairs), alternating)


@stage("kto", KTOStageConfig)
def run(cfg: KTOStageConfig, ctx: StageContext) -> StageResult:
    """Kahneman-Tversky Optimization with TRL's KTOTrainer (full, LoRA, or HFT-selected parameters)."""
    from datasets import Dataset

    seed = cfg.seed_in(ctx)
    tokenizer = load_tokenizer(ctx.input_model, cfg.trust_remote_code)
    chat = bool(tokenizer.chat_template)
    replayed, replay_stats = replay_rows(cfg.replay, "kto", ctx.log, seed)
    own, data_stats = load_sources(cfg.data, "kto", ctx.log, seed)
    rows = spread(kto_order(as_chat_or_text(own, chat)), kto_order(as_chat_or_text(replayed, chat)))
    from trl import KTOConfig, KTOTrainer  # after the data check: importing TRL takes seconds

    return run_trl_stage(
        cfg, ctx, (KTOConfig, KTOTrainer), Dataset.from_list(rows), data_stats + replay_stats, tokenizer,
        reference=True,
        args=dict(loss_type=cfg.loss_type, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                  undesirable_weight=cfg.undesirable_weight, trust_remote_code=cfg.trust_remote_code,
                  dataset_num_proc=None),
    )
