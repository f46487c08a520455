"""Supervised fine-tuning on TRL's SFTTrainer, full or LoRA, with `trainable:` (HFT) applied.

Chat data (`messages`) trains on assistant tokens only (`assistant_only_loss: true`); prompt/completion data trains
on the completion only (TRL's default), conversational or not. Conversational rows need a chat template. Where the
template has `{% generation %}` markers, or is one TRL ships a marked copy of (Qwen2.5, Llama 3, ...), TRL marks
the assistant tokens itself; for any other template posttrain marks them from the template (posttrain/chat_mask.py)
and hands TRL the tokenized rows, refusing before the model loads only a conversation whose template rewrites an
earlier turn (naming the row and the turn).
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_serializer, model_validator

from posttrain.chat_mask import mask_conversations, source_row_names
from posttrain.data import DataError, DataSource, is_conversational, load_sources, rows_dataset, sft_rows
from posttrain.data_stream import sft_stream, streamed
from posttrain.mixture import Replayable
from posttrain.models import load_tokenizer
from posttrain.stages.base import StageContext, StageResult, stage
from posttrain.stages.common import TrainableStage, TrainerConfig
from posttrain.stages.replay import replay_rows
from posttrain.stages.trl_run import run_trl_stage


def _trl_trainer() -> TrainerConfig:
    return TrainerConfig(learning_rate=2e-5)  # TRL 1.16's SFTConfig; max_length 1024 is TrainerConfig's (TRL's too)


class SFTStageConfig(Replayable, TrainableStage):
    data: list[DataSource] = Field(default_factory=lambda: [DataSource(source="arithmetic")], min_length=1)
    trainer: TrainerConfig = Field(default_factory=_trl_trainer)
    # TRL's default is False; prompts and user turns are inputs, not targets (TÜLU 3 masks them too).
    assistant_only_loss: bool = Field(True, description="chat data: loss on assistant turns only")
    # TRL's defaults (False). TRL builds each row's labels (assistant mask included) before it packs, so packing
    # changes which rows share a sequence, never which tokens carry loss; rows stay apart by their position_ids
    # (flash attention, or transformers' packed-sequence mask for sdpa/eager).
    packing: bool = Field(False, description="pack rows into max_length sequences (TRL's best-fit decreasing)")
    padding_free: bool = Field(False, description="flatten each batch into one unpadded sequence (implied by packing)")
    no_stream: ClassVar[str] = ""  # a streamed source trains from an IterableDataset (posttrain.data_stream)

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict:
        # Left out at their defaults: a field every dump carried would change the config hash of every finished
        # stage (and of every cached world model). Replaces Replayable's serializer (a class has one), so `replay`
        # is listed here too.
        out = handler(self)
        for key in ("replay", "packing", "padding_free"):
            if not out.get(key):
                out.pop(key, None)
        return out

    @model_validator(mode="after")
    def _packing_needs_a_length(self) -> "SFTStageConfig":
        # TRL packs into max_length-token sequences and fails at trainer start (after the model loaded) without one
        if self.packing and self.trainer.max_length is None:
            raise ValueError("packing: rows are packed into trainer.max_length tokens; set trainer.max_length "
                             "(e.g. 1024) or drop packing")
        return self

    def data_sources(self) -> list[tuple[DataSource, str]]:
        return [(src, "sft") for src in self.data]


def check_chat_template(tokenizer, conversational: bool, assistant_only: bool) -> bool:
    """Refuse, before any model loads, chat data without a chat template (TRL fails there only after the model has
    loaded, with a TypeError). Returns whether posttrain must mark the assistant tokens itself: assistant-only loss
    on a template that has no `{% generation %}` markers and that TRL has no marked copy of."""
    if not conversational:
        return False
    if not tokenizer.chat_template:
        name = tokenizer.name_or_path or "the input model"
        raise DataError(f"conversational SFT rows need a tokenizer with a chat template; {name}'s has none")
    if not assistant_only:
        return False
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return False
    # SFTTrainer swaps in TRL's own marked copy of a template it knows (get_training_chat_template) and raises
    # ValueError for any other; asking the same function here makes the same decision without the model.
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return True
    return False


@stage("sft", SFTStageConfig)
def run(cfg: SFTStageConfig, ctx: StageContext) -> StageResult:
    """Supervised fine-tuning with TRL's SFTTrainer (full, LoRA, or HFT-selected parameters)."""
    seed = cfg.seed_in(ctx)
    if streamed(cfg.data):  # an IterableDataset read row by row while training (posttrain.data_stream)
        replayed = replay_rows(cfg.replay, "sft", ctx.log, seed)  # in memory, mixed into the stream
        dataset, data_stats, mode = sft_stream(cfg.data, ctx.log, seed, replayed)
        conversational, messages = mode != "plain", mode == "messages"
    else:
        rows, data_stats = load_sources(cfg.data, "sft", ctx.log, seed)
        replayed, replay_stats = replay_rows(cfg.replay, "sft", ctx.log, seed)
        rows, data_stats = rows + replayed, data_stats + replay_stats
        dataset = rows_dataset(sft_rows(rows))
        conversational, messages = is_conversational(dataset), "messages" in dataset.column_names
    assistant_only = cfg.assistant_only_loss and messages
    tokenizer = load_tokenizer(ctx.input_model, cfg.trust_remote_code)
    own_masks = check_chat_template(tokenizer, conversational, assistant_only)
    if own_masks:  # TRL takes tokenized rows as they are and trains on their assistant_masks (-100 labels off them)
        dataset = mask_conversations(tokenizer, dataset, source_row_names(data_stats))
    from trl import SFTConfig, SFTTrainer  # after the data check: importing TRL takes seconds

    return run_trl_stage(cfg, ctx, (SFTConfig, SFTTrainer), dataset, data_stats, tokenizer, args=dict(
        assistant_only_loss=assistant_only and not own_masks, packing=cfg.packing, padding_free=cfg.padding_free,
        dataset_num_proc=None))

