"""Which tensors of model folders correspond, by name: the block a tensor belongs to, its per-block merge
coefficients, the vocabulary-sized tensors, and the checks that model folders can be merged tensor by tensor.

Shared by the merge and transfer stages. Per-block coefficients follow aTLAS (Zhang et al. 2024, "Knowledge
Composition using Task Vectors with Learned Anisotropic Scaling"): one coefficient per model per block. aTLAS
learns them by gradient descent; here they are given by the user (or searched), and ``coefficients_for`` only
looks them up.
"""
from __future__ import annotations

import re

import torch

from torch import Tensor

from posttrain.tensors import MergeMismatch, ShardedReader

__all__ = ["block_of", "coefficients_for", "is_vocab_tensor", "check_compatible", "align_rows"]

# "model.layers.3.mlp.up_proj.weight", "transformer.h.3.attn...", "gpt_neox.layers.3...", "blocks.3..."
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_in|word_embeddings|embeddings)(?:\.|$)")
_HEAD_RE = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output)(?:\.|$)")
_NORM_RE = re.compile(r"(?:^|\.)(?:norm|ln_f|final_layer_norm|final_layernorm)(?:\.|$)")


def block_of(tensor_name: str) -> str:
    """Return the block a tensor belongs to: ``"layers.<i>"``, ``"embed"``, ``"lm_head"``, ``"norm"``, or
    ``"other"``.

    Blocks are the unit of aTLAS-style per-block coefficients. Layer indices are checked first, so a norm
    inside a decoder layer ("model.layers.0.input_layernorm.weight") belongs to ``layers.0``; only the final
    norm outside the layers is ``"norm"``.
    """
    m = _LAYER_RE.search(tensor_name)
    if m:
        return f"layers.{m.group(1)}"
    if _EMBED_RE.search(tensor_name):
        return "embed"
    if _HEAD_RE.search(tensor_name):
        return "lm_head"
    if _NORM_RE.search(tensor_name):
        return "norm"
    return "other"


def coefficients_for(
    tensor_name: str, weights: list[float], per_block: dict[str, list[float]] | None
) -> list[float]:
    """Return the per-model coefficients for ``tensor_name``: ``per_block[block_of(name)]`` when given,
    else the global ``weights`` (aTLAS, Zhang et al. 2024, with fixed rather than learned coefficients)."""
    if per_block:
        block = block_of(tensor_name)
        if block in per_block:
            coeffs = [float(c) for c in per_block[block]]
            if len(coeffs) != len(weights):
                raise ValueError(
                    f"per-block coefficients for {block!r} have {len(coeffs)} entries but there are "
                    f"{len(weights)} models"
                )
            return coeffs
    return [float(w) for w in weights]


_VOCAB_RE = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings)(?:\.|$)")


def is_vocab_tensor(name: str) -> bool:
    """True for tensors with one row per vocabulary entry (input embeddings and the output head)."""
    return bool(_VOCAB_RE.search(name))


def check_compatible(
    readers: list[ShardedReader], names: bool = True, shapes: bool = True, dtypes: bool = True
) -> None:
    """Raise :class:`MergeMismatch` naming the first tensor that stops a tensor-by-tensor merge.

    Compares every reader with the first: tensor names (both directions), then, tensor by tensor in sorted
    order, shapes and dtypes. A row-count difference on an embedding or output head is reported as a
    vocabulary mismatch, because the fix is the transfer stage, not the merge.
    """
    if len(readers) < 2:
        return
    ref = readers[0]
    for other in readers[1:]:
        if names:
            _compare_names(ref, other)
        for name in ref.names():
            if name not in other:
                continue
            if shapes:
                _compare_shapes(name, ref, other)
            if dtypes and ref.dtype(name) != other.dtype(name):
                raise MergeMismatch(
                    f"tensor {name!r} is {_dt(ref.dtype(name))} in {ref.folder} but {_dt(other.dtype(name))} "
                    f"in {other.folder}"
                )


def _compare_names(ref: ShardedReader, other: ShardedReader) -> None:
    a, b = set(ref.names()), set(other.names())
    only = sorted((a - b) | (b - a))
    if only:
        first = only[0]
        has, lacks = (ref, other) if first in a else (other, ref)
        raise MergeMismatch(f"tensor {first!r} is in {has.folder} but not in {lacks.folder}")


def _compare_shapes(name: str, ref: ShardedReader, other: ShardedReader) -> None:
    sa, sb = ref.shape(name), other.shape(name)
    if sa == sb:
        return
    if is_vocab_tensor(name) and len(sa) == len(sb) and sa[1:] == sb[1:]:
        raise MergeMismatch(
            f"tensor {name!r}: vocabulary sizes differ ({sa[0]} vs {sb[0]}); "
            "use the transfer stage to align vocabularies"
        )
    raise MergeMismatch(f"tensor {name!r} has shape {list(sa)} in {ref.folder} but {list(sb)} in {other.folder}")


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def align_rows(source_vocab: dict[str, int], target_vocab: dict[str, int], source_rows: int,
               target_rows: int) -> tuple[Tensor, dict[str, int]]:
    """Match vocabulary rows by token string: for each target row, the source row of the same token or −1.

    Ids at or past a tensor's row count are ignored (a tokenizer may know fewer ids than a padded embedding
    has rows; rows without a token also get −1). Returns the index [target_rows] and the alignment counts.
    """
    rows = torch.full((target_rows,), -1, dtype=torch.long)
    unmatched = 0
    for token, tid in target_vocab.items():
        if tid >= target_rows:
            continue
        sid = source_vocab.get(token)
        if sid is not None and sid < source_rows:
            rows[tid] = sid
        else:
            unmatched += 1
    matched = int((rows >= 0).sum())
    covered = {tid for tid in target_vocab.values() if tid < target_rows}
    source_only = sum(1 for t, sid in source_vocab.items() if sid < source_rows and t not in target_vocab)
    return rows, {"matched_tokens": matched, "unmatched_tokens": unmatched, "source_only_tokens": source_only,
                  "rows_without_token": target_rows - len(covered)}
