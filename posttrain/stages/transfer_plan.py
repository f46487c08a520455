"""The transfer stage's plan: the three models opened and checked (architectures, tensor names and shapes,
source vocabularies), the vocabulary rows aligned and the special tokens of the tokenizer it writes chosen,
before anything is written (see stages/transfer.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.merging.compat import align_rows, check_compatible, is_vocab_tensor
from posttrain.models import ModelError
from posttrain.stages.base import StageContext
from posttrain.tensors import MergeMismatch, ShardedReader


class TransferRefused(MergeMismatch, ModelError):
    """The inputs cannot be transferred (architecture, names, shapes, source vocabularies, special tokens)."""


_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")
_CONFIG_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")

def check_architectures(target: Path, sources: list[Path]) -> None:
    ref = json.loads((target / "config.json").read_text())
    for folder in sources:
        cfg = json.loads((folder / "config.json").read_text())
        for key in ("model_type", "architectures"):
            if cfg.get(key) != ref.get(key):
                raise TransferRefused(f"config.json {key} is {cfg.get(key)!r} in {folder} but {ref.get(key)!r} in "
                                      f"{target}: a diff cannot be carried across architectures")


def check_tensors(target: ShardedReader, source_base: ShardedReader, source_finetuned: ShardedReader) -> list[str]:
    """Refuse any shape difference except vocabulary row counts between source and target, and any dtype
    difference between the two sources; return the names of the vocabulary tensors whose rows must be aligned.

    The target may have another dtype (the sum is cast to it); the sources may not: Δ between a float32 tensor
    and its bfloat16 copy is mostly the cast's rounding (about 2^-9 of each weight), as large as many fine-tuning
    updates, so it would carry noise rather than the fine-tuning."""
    vocab = []
    for name in target.names():
        sb, sf, t = source_base.shape(name), source_finetuned.shape(name), target.shape(name)
        if sb != sf:
            raise TransferRefused(f"tensor {name!r} has shape {list(sb)} in {source_base.folder} but {list(sf)} in "
                                  f"{source_finetuned.folder}: the source models must share every shape")
        db, df = source_base.dtype(name), source_finetuned.dtype(name)
        if db != df:
            raise TransferRefused(f"tensor {name!r} is {str(db).removeprefix('torch.')} in {source_base.folder} but "
                                  f"{str(df).removeprefix('torch.')} in {source_finetuned.folder}: a diff across "
                                  "dtypes is mostly rounding; save both sources in one dtype")
        if is_vocab_tensor(name) and len(t) == len(sb) == 2 and t[1:] == sb[1:]:
            vocab.append(name)
        elif t != sb:
            raise TransferRefused(f"tensor {name!r} has shape {list(t)} in {target.folder} but {list(sb)} in "
                                  f"{source_base.folder}")
    return vocab


def load_tokenizer(folder: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}: no loadable tokenizer ({type(e).__name__}); the transfer matches vocabulary "
                         "rows by token string") from None


def check_same_vocab(a: dict[str, int], b: dict[str, int], fa: Path, fb: Path) -> None:
    if a == b:
        return
    diff = sorted(set(a.items()) ^ set(b.items()))
    token = diff[0][0]
    raise TransferRefused(f"source vocabularies differ: token {token!r} is id {a.get(token)} in {fa} but "
                          f"{b.get(token)} in {fb}; source_base and source_finetuned must share a vocabulary")


def carry_specials(target_tok: Any, source_tok: Any, source_dir: Path) -> Any:
    """The target's tokenizer (its vocabulary fits the target's rows) with the source's chat template and
    special-token roles; every special token of the source must be a token of the target."""
    import copy

    vocab = target_tok.get_vocab()
    for token in source_tok.all_special_tokens:
        if token not in vocab:
            raise TransferRefused(f"tokenizer_from: source_finetuned: special token {token!r} of {source_dir} is "
                                  "not in the target's vocabulary (the output keeps the target's rows)")
    out = copy.deepcopy(target_tok)
    for attr in _SPECIAL:
        setattr(out, attr, getattr(source_tok, attr))
    out.chat_template = source_tok.chat_template
    return out


def special_ids(path: Path, chosen_tok: Any, written_tok: Any, ctx: StageContext) -> dict[str, Any]:
    """bos/eos/pad ids of `path` (a config written for `chosen_tok`) in the written tokenizer's ids.

    The written tokenizer's own bos/pad win; its eos comes first among eos ids (a config may list several,
    e.g. end-of-text and end-of-turn) so generation stops where the chat template ends a turn.
    """
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    inverse = {i: t for t, i in chosen_tok.get_vocab().items()}
    vocab = written_tok.get_vocab()
    out: dict[str, Any] = {}
    for key in _CONFIG_IDS:
        value = cfg.get(key)
        ids = [] if value is None else list(value) if isinstance(value, list) else [value]
        mapped = []
        for i in ids:
            token = inverse.get(i)
            if token in vocab:
                mapped.append(vocab[token])
            else:
                ctx.log(f"transfer: {path.name} {key} {i} has no token in the written tokenizer; dropped")
        own = getattr(written_tok, key)
        if own is not None:
            mapped = [own] + [i for i in mapped if i != own] if key == "eos_token_id" else [own]
        out[key] = None if not mapped else mapped[0] if len(mapped) == 1 else mapped
    return out


@dataclass
class TransferPlan:
    """Everything a transfer needs except λ (a search writes several transfers from one plan)."""

    target: ShardedReader
    source_base: ShardedReader
    source_finetuned: ShardedReader
    rows: dict[str, Tensor]  # vocabulary tensor name -> source row per target row
    dtype: torch.dtype
    max_shard_bytes: int
    tokenizer: Any | None  # None: copy the target's tokenizer files; else save this one
    config_ids: dict[str, Any] = field(default_factory=dict)  # config.json special-token ids
    generation_ids: dict[str, Any] = field(default_factory=dict)  # generation_config.json special-token ids
    target_dir: Path = Path()
    vocab: dict[str, int] = field(default_factory=dict)  # alignment counts (metrics)

    def close(self) -> None:
        for r in (self.target, self.source_base, self.source_finetuned):
            r.close()


def plan_transfer(cfg: Any, ctx: StageContext, target: Path, source_base: Path,
          source_finetuned: Path) -> TransferPlan:
    """Open the three models and refuse what cannot be transferred, before anything is written."""
    check_architectures(target, [source_base, source_finetuned])
    readers = [ShardedReader(f, allow_pickle=cfg.allow_pickle) for f in (target, source_base, source_finetuned)]
    try:
        check_compatible(readers, names=True, shapes=False, dtypes=False)  # names only; shapes below
        vocab_names = check_tensors(*readers)
        toks = [load_tokenizer(f, cfg.trust_remote_code) for f in (target, source_base, source_finetuned)]
        t_vocab, sb_vocab, sf_vocab = (t.get_vocab() for t in toks)
        check_same_vocab(sb_vocab, sf_vocab, source_base, source_finetuned)
        rows: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for name in vocab_names:
            rows[name], counts = align_rows(sb_vocab, t_vocab, readers[1].shape(name)[0], readers[0].shape(name)[0])
        chosen = (target, toks[0]) if cfg.tokenizer_from == "target" else (source_finetuned, toks[2])
        out_tok = None if cfg.tokenizer_from == "target" else carry_specials(toks[0], chosen[1], source_finetuned)
        written = out_tok if out_tok is not None else toks[0]
        config_ids = special_ids(chosen[0] / "config.json", chosen[1], written, ctx)
        gen = chosen[0] / "generation_config.json"  # a folder without one generates with config.json's ids
        generation_ids = special_ids(gen if gen.is_file() else chosen[0] / "config.json", chosen[1], written, ctx)
    except BaseException as e:
        for r in readers:
            r.close()
        if isinstance(e, MergeMismatch) and not isinstance(e, TransferRefused):  # check_compatible's names
            raise TransferRefused(str(e)) from None
        raise
    return TransferPlan(target=readers[0], source_base=readers[1], source_finetuned=readers[2], rows=rows,
                 dtype=torch.float64 if cfg.dtype == "float64" else torch.float32,
                 max_shard_bytes=cfg.max_shard_bytes, tokenizer=out_tok, config_ids=config_ids,
                 generation_ids=generation_ids, target_dir=target, vocab=counts)
