"""Model-merging methods: one pure, registered function per method, applied to one tensor name at a time.

Every method has the signature::

    fn(base, tensors, weights, *, generator=None, dtype=torch.float32, **method_params) -> Tensor

``base`` is the pre-trained tensor (``None`` is allowed only for ``linear``), ``tensors`` the same tensor from
each fine-tuned model and ``weights`` one coefficient per fine-tuned model. The math runs in ``dtype``
(float32, or float64 when the caller asks); the result comes back in that dtype and the caller casts it to
the output dtype. The merge stage streams tensors through these functions one name at a time (mergekit's
design), so nothing here sees a whole model.

Task-vector methods (everything except ``linear``) work on τ_i = θ_i − θ_base and return
``base + lam · combine(w_i, τ_i)``. Models whose weight is exactly 0 are left out before any math, so a
coefficient of 0 gives the base back bit for bit and a zero-weight model neither votes in a sign election
nor draws from the random generator.

Libraries checked: ``peft.utils.merge_utils`` (0.21) and mergekit's ``generalized_task_arithmetic.py`` and
``sparsify.py``. TIES steps 2-3 follow peft's ``calculate_majority_sign_mask(method="total")`` (sign of the
summed values = the sign with the larger total magnitude) and ``disjoint_merge`` (mean over the entries that
agree with the elected sign) operation for operation, so the results are the same bits (tests compare them),
but model by model instead of on a stacked (models, ...) tensor: no stacked copy, no int64 sign tensors, and
no import of peft, which pulls in transformers' modeling code (~4 s). Not reused, and why, is noted at each
helper below.

Per-block coefficients follow aTLAS (Zhang et al. 2024, "Knowledge Composition using Task Vectors with
Learned Anisotropic Scaling"): one coefficient per model per block. aTLAS learns them by gradient descent;
here they are given by the user, and ``coefficients_for`` only looks them up.
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from posttrain.registry import MERGE_METHODS

__all__ = [
    "block_of",
    "coefficients_for",
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "trim_magnitude",
    "drop_random",
    "drop_outliers",
]

# ---------------------------------------------------------------------------------------------- blocks

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


# --------------------------------------------------------------------------------------------- helpers


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 only on request (exact-value tests, tiny models); everything else computes in float32 so that
    # bf16/fp16 inputs do not lose the small differences that task vectors are made of.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(base: Tensor | None, tensors: list[Tensor], weights: list[float], needs_base: bool) -> None:
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        raise ValueError("no tensors to merge")
    if needs_base and base is None:
        raise ValueError("this merge method needs a base model (task vectors are θ_i − θ_base)")
    shape = tensors[0].shape if base is None else base.shape
    for t in tensors:
        if t.shape != shape:
            raise ValueError(f"shape {tuple(t.shape)} differs from {tuple(shape)}")


def _task_vectors(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], dtype: torch.dtype
) -> tuple[Tensor, list[Tensor], list[float]]:
    """Return (base in the work dtype, τ_i for the models with nonzero weight, those weights)."""
    _check(base, tensors, weights, needs_base=True)
    wd = _work_dtype(dtype)
    b = base.to(wd, copy=True)  # a copy: the result must never alias the caller's base tensor
    kept = [(t, float(w)) for t, w in zip(tensors, weights) if float(w) != 0.0]
    return b, [t.to(wd) - b for t, _ in kept], [w for _, w in kept]


def _check_fraction(what: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value}")


def _count_of(fraction: float, n: int) -> int:
    # floor(fraction * n), but immune to float error: int(0.29 * 100) is 28 in IEEE arithmetic, this is 29.
    return min(n, max(0, math.floor(fraction * n + 1e-9)))


def trim_magnitude(tau: Tensor, density: float) -> Tensor:
    """Keep the ``floor(density · numel)`` entries of largest magnitude, zero the rest (TIES step 1, "trim").

    Not peft's ``magnitude_based_pruning``: it computes ``k = int(density * numel)``, which truncates float
    error downwards (0.29 · 100 → 28), and its ``prune`` wrapper warns at density 1.
    """
    _check_fraction("density", density)
    if density >= 1.0:
        return tau
    k = _count_of(density, tau.numel())
    flat = tau.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True, sorted=False).indices] = 1
    return (flat * mask).reshape(tau.shape)


def drop_random(tau: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability p = 1 − density, scale the kept ones by
    1/(1 − p), so the expected value of every entry is unchanged.

    Not peft's ``random_pruning`` (no generator argument, so not seedable per call) nor mergekit's
    ``bernoulli`` (its "rescale" matches the L1 norm of the kept entries instead of the paper's 1/(1 − p)).
    """
    _check_fraction("density", density)
    if density >= 1.0:
        return tau  # p = 0: nothing dropped, no random numbers drawn, bit-exact task arithmetic.
    if density <= 0.0:
        return torch.zeros_like(tau)
    # rand < density draws the same stream and gives the same mask bit for bit as the earlier
    # bernoulli(full_like(tau, density)): both take one uniform per entry from the generator (24 bits for
    # float32, 53 for float64) and keep it when below density cast to tau's dtype. Without the full_like
    # probability tensor and the float 0/1 mask: two fewer tensor-sized allocations.
    keep = torch.rand(tau.shape, generator=generator, dtype=tau.dtype) < density
    return torch.mul(tau, keep).div_(density)


def drop_outliers(tau: Tensor, beta: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask (Davari & Belilovsky 2024): zero the ``beta`` fraction of entries with the
    largest magnitude and the ``gamma`` fraction with the smallest; keep the middle.

    Not mergekit's ``magnitude_outliers``: it is parameterised by density and a top fraction, and with a top
    count of 0 its slice ``indices[n_bot:-0]`` is empty, which zeroes the whole tensor.
    """
    _check_fraction("beta", beta)
    _check_fraction("gamma", gamma)
    n = tau.numel()
    n_top, n_bot = _count_of(beta, n), _count_of(gamma, n)
    if n_top == 0 and n_bot == 0:
        return tau
    flat = tau.reshape(-1)
    order = torch.argsort(flat.abs(), stable=True)  # ascending magnitude
    mask = torch.zeros_like(flat)
    mask[order[n_bot : n - n_top]] = 1  # empty when beta + gamma ≥ 1: all dropped
    return (flat * mask).reshape(tau.shape)


def _weighted_sum(taus: list[Tensor], weights: list[float]) -> Tensor:
    out = torch.zeros_like(taus[0])
    for tau, w in zip(taus, weights):
        out.add_(tau, alpha=w)
    return out


def _sign_consensus(taus: list[Tensor], weights: list[float]) -> Tensor:
    """TIES steps 2-3 on the weighted task vectors w_i·τ_i: elect the sign with the larger total magnitude,
    then average the entries that agree with it (zeros, i.e. trimmed or dropped entries, never count).

    peft's arithmetic, model by model: Σ from a +0 accumulator is ``stacked.sum(0)`` bit for bit for up to 4
    models (checked; with 5 or more torch's reduction regroups the terms, so the stacked sum is used there).
    sign(x) == +1 / −1 is x > 0 / x < 0 (NaN and 0 agree with neither sign, as in peft).
    """
    xs = [tau * w for tau, w in zip(taus, weights)]
    if len(xs) > 4:
        total = torch.stack(xs, dim=0).sum(dim=0)
    else:
        total = torch.zeros_like(xs[0])
        for x in xs:
            total.add_(x)
    positive = total >= 0
    del total
    mixed, count = torch.zeros_like(xs[0]), torch.zeros_like(xs[0])
    for x in xs:
        agree = torch.where(positive, x > 0, x < 0)
        count.add_(agree)
        mixed.add_(x.mul_(agree))  # x is ours (tau * w above)
    if len(xs) > 4:  # the stacked order again, for the same bits
        mixed = torch.stack(xs, dim=0).sum(dim=0)
    return mixed.div_(count.clamp_(min=1.0))


def _rebase(b: Tensor, lam: float, combined: Tensor) -> Tensor:
    """b + lam · combined, in place in ``combined`` (the same bits: IEEE addition is commutative)."""
    return combined.mul_(lam).add_(b)


# --------------------------------------------------------------------------------------------- methods


@MERGE_METHODS.register("linear")
def linear(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    normalize: bool = True,
) -> Tensor:
    """Weighted average of the models, Σ w_i θ_i / Σ w_i ("model soups", Wortsman et al. 2022).

    ``base`` is ignored (a soup averages fine-tuned models; list the base among ``tensors`` to include it).
    With ``normalize=False`` the weighted sum is returned as is. The paper's uniform soup is all weights
    equal; its greedy soup is a selection loop above this function.
    """
    del base, generator  # same signature as every method; a soup needs neither
    _check(None, tensors, weights, needs_base=False)
    wd = _work_dtype(dtype)
    out = _weighted_sum([t.to(wd) for t in tensors], [float(w) for w in weights])
    if normalize:
        total = math.fsum(float(w) for w in weights)
        if abs(total) < 1e-12:
            raise ValueError("linear merge with normalize=True needs weights that do not sum to 0")
        out = out / total
    return out


@MERGE_METHODS.register("task_arithmetic")
def task_arithmetic(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    lam: float = 1.0,
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"):
    θ = θ_base + lam · Σ w_i (θ_i − θ_base). Negative weights are task negation."""
    del generator
    b, taus, ws = _task_vectors(base, tensors, weights, dtype)
    if not taus or lam == 0:
        return b
    return _rebase(b, lam, _weighted_sum(taus, ws))


@MERGE_METHODS.register("ties")
def ties(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    density: float = 0.2,
    lam: float = 1.0,
) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim each τ_i to its top-``density`` magnitudes, elect a sign per
    entry by total magnitude, take the disjoint mean of the agreeing entries, return θ_base + lam · τ_m.

    Departure: the paper has no per-model weights. Here TIES runs on the weighted vectors w_i·τ_i (weights
    all 1 is the paper). peft elects the sign on the unweighted vectors; mergekit divides by Σ w_i over the
    agreeing models instead of their count. Trimming is per tensor, the paper trims the whole task vector.
    """
    del generator
    b, taus, ws = _task_vectors(base, tensors, weights, dtype)
    if not taus or lam == 0:
        return b
    trimmed = [trim_magnitude(tau, density) for tau in taus]
    return _rebase(b, lam, _sign_consensus(trimmed, ws))


@MERGE_METHODS.register("dare_linear")
def dare_linear(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    density: float = 0.1,
    lam: float = 1.0,
) -> Tensor:
    """DARE then task arithmetic (Yu et al. 2024, "Language Models are Super Mario"): each τ_i loses every
    entry with probability 1 − ``density`` and the rest are scaled by 1/``density``; then
    θ = θ_base + lam · Σ w_i τ̃_i. ``density=1`` is exactly task arithmetic. Pass a seeded ``generator`` for
    reproducible merges; the masks are drawn per tensor, in model order."""
    b, taus, ws = _task_vectors(base, tensors, weights, dtype)
    if not taus or lam == 0:
        return b
    dropped = [drop_random(tau, density, generator) for tau in taus]
    return _rebase(b, lam, _weighted_sum(dropped, ws))


@MERGE_METHODS.register("dare_ties")
def dare_ties(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    density: float = 0.1,
    lam: float = 1.0,
) -> Tensor:
    """DARE then TIES sign election and disjoint mean (Yu et al. 2024, the DARE + TIES-Merging setting).

    DARE's random drop replaces TIES's magnitude trim (as in mergekit and peft); the sign election and the
    disjoint mean run on w_i·τ̃_i, as in :func:`ties`.
    """
    b, taus, ws = _task_vectors(base, tensors, weights, dtype)
    if not taus or lam == 0:
        return b
    dropped = [drop_random(tau, density, generator) for tau in taus]
    return _rebase(b, lam, _sign_consensus(dropped, ws))


@MERGE_METHODS.register("breadcrumbs")
def breadcrumbs(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    beta: float = 0.01,
    gamma: float = 0.9,
    lam: float = 1.0,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): in each τ_i zero the ``beta`` fraction of largest and the
    ``gamma`` fraction of smallest magnitudes, then task arithmetic θ_base + lam · Σ w_i τ̂_i.

    Departure: the paper masks per layer; here per tensor (one tensor is all this function sees). The
    defaults keep the middle 9% of magnitudes; tune ``beta`` and ``gamma`` per model family.
    """
    del generator
    b, taus, ws = _task_vectors(base, tensors, weights, dtype)
    if not taus or lam == 0:
        return b
    masked = [drop_outliers(tau, beta, gamma) for tau in taus]
    return _rebase(b, lam, _weighted_sum(masked, ws))
