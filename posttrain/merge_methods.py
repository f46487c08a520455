"""Model-merging methods: one pure, registered function per method, applied to one tensor name at a time.

Every method has the signature::

    fn(base, tensors, weights, *, generator=None, dtype=torch.float32, **method_params) -> Tensor

``base`` is the pre-trained tensor (``None`` is allowed only for ``linear``), ``tensors`` the same tensor from
each fine-tuned model and ``weights`` one coefficient per fine-tuned model. The math runs in ``dtype``
(float32, or float64 when the caller asks); the result comes back in that dtype and the caller casts it to
the output dtype. The merge stage streams tensors through these functions one name at a time (mergekit's
design), so nothing here sees a whole model; for large tensors it passes slices of ~1 MB, and every method
here gives the same bits for a slice as for the whole tensor (elementwise math, one random stream per model,
TIES's magnitude thresholds computed over the whole tensor and passed in; see posttrain/merge_stream.py).

``generator`` (DARE's masks) is one generator shared by the models (drawn in model order) or a list of one per
model (the stage's choice: each model's stream then continues slice after slice, so slicing does not change
which numbers a model draws). A generator is a ``torch.Generator`` or a ``numpy.random.Generator``; the stage
uses numpy's PCG64, which fills a float32 buffer in ~1.5 ns an entry against torch's ~2.3 (measured on one
core; the draw was half of a DARE merge's time).

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
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from posttrain.registry import MERGE_METHODS

if TYPE_CHECKING:
    from posttrain.merge_stream import Scratch  # the stage's buffers; methods only call .take

__all__ = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "trim_magnitude",
    "trim_threshold",
    "kth_largest",
    "drop_random",
    "drop_outliers",
]

# --------------------------------------------------------------------------------------------- helpers


def _empty(scratch: Scratch | None, key: str, like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(like.shape, dtype=dtype) if scratch is None else scratch.take(key, like.shape, dtype)


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
    base: Tensor | None, tensors: list[Tensor], weights: list[float], dtype: torch.dtype,
    scratch: Scratch | None = None,
) -> tuple[Tensor, list[Tensor], list[float]]:
    """Return (base in the work dtype, τ_i for the models with nonzero weight, those weights). The τ_i are
    fresh (or scratch) tensors the caller may modify; the base may be the caller's tensor: read it only."""
    _check(base, tensors, weights, needs_base=True)
    wd = _work_dtype(dtype)
    b = base.to(wd)
    kept = [(t, float(w)) for t, w in zip(tensors, weights) if float(w) != 0.0]
    # torch.sub widens t to b's dtype element by element: the bits of t.to(wd) - b, without the copy.
    taus = [torch.sub(t, b, out=_empty(scratch, f"tau{i}", b, wd)) for i, (t, _) in enumerate(kept)]
    return b, taus, [w for _, w in kept]


def _base_copy(base: Tensor, dtype: torch.dtype) -> Tensor:
    return base.to(_work_dtype(dtype), copy=True)  # a copy: the result must never alias the caller's base


def _per_model(values: list | None, weights: list[float], what: str) -> list:
    """``values`` (one per model, or None) for the models with nonzero weight, in the order of _task_vectors."""
    if values is None:
        return [None] * sum(float(w) != 0.0 for w in weights)
    if len(values) != len(weights):
        raise ValueError(f"{len(values)} {what} but {len(weights)} models")
    return [v for v, w in zip(values, weights) if float(w) != 0.0]


def _generators(generator: torch.Generator | np.random.Generator | list | None, weights: list[float]) -> list:
    if isinstance(generator, (list, tuple)):
        return _per_model(list(generator), weights, "generators")
    return _per_model([generator] * len(weights), weights, "generators")  # one stream, drawn in model order


def _check_fraction(what: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value}")


def _count_of(fraction: float, n: int) -> int:
    # floor(fraction * n), but immune to float error: int(0.29 * 100) is 28 in IEEE arithmetic, this is 29.
    return min(n, max(0, math.floor(fraction * n + 1e-9)))


_NP = {torch.float32: np.float32, torch.float64: np.float64}


def kth_largest(values: Tensor, k: int) -> float:
    """The k-th largest of ``values`` (1 ≤ k ≤ numel), exactly. numpy's introselect (``np.partition``,
    ~2 ns an element on one core) rather than ``torch.kthvalue`` (15-30 ns) or a sort or top-k."""
    flat = values.detach().reshape(-1).cpu().numpy()
    return float(np.partition(flat, flat.size - k)[flat.size - k])


def trim_threshold(tau: Tensor, density: float) -> float:
    """The magnitude that TIES's trim keeps from: the ``floor(density · numel)``-th largest ``|τ|`` (``inf``
    when that count is 0: nothing is kept, unless a task vector holds infinities)."""
    k = _count_of(density, tau.numel())
    return kth_largest(tau.abs(), k) if k > 0 else math.inf


def trim_magnitude(tau: Tensor, density: float, threshold: float | None = None) -> Tensor:
    """Keep the ``floor(density · numel)`` entries of largest magnitude, zero the rest (TIES step 1, "trim").

    Kept are the entries with ``|τ| >= threshold``, the k-th largest magnitude (``trim_threshold``; the stage
    computes it over the whole tensor and passes it in with each slice). Departure from a top-k (the paper,
    peft, mergekit): entries tied with the k-th magnitude are all kept, so more than k survive only when the
    k-th value repeats (never seen in float task vectors except at 0, where keeping zeros changes nothing).
    Not peft's ``magnitude_based_pruning`` either: it computes ``k = int(density * numel)``, which truncates
    float error downwards (0.29 · 100 → 28), and its ``prune`` wrapper warns at density 1.
    """
    _check_fraction("density", density)
    return tau if density >= 1.0 else _trim_(tau.clone(), density, threshold, None)


def _trim_(tau: Tensor, density: float, threshold: float | None, scratch: Scratch | None) -> Tensor:
    if threshold is None:
        threshold = trim_threshold(tau, density)
    # keep = 1.0 where |τ| >= threshold, else 0.0, in three vectorised float passes (~5x faster than torch's
    # comparison into a bool tensor and a multiply by it): threshold_ zeroes |τ| <= b, b the float just below
    # the threshold, and sign_ maps what is left to 1.0. A kept |τ| of 0 gives 0.0, which changes nothing.
    keep = torch.abs(tau, out=_empty(scratch, "keep", tau, tau.dtype))
    below = float(np.nextafter(np.array(threshold, dtype=_NP[tau.dtype]), -np.inf))
    torch.threshold_(keep, below, 0.0).sign_()
    return tau.mul_(keep)  # × 1.0 keeps the bits, × 0.0 gives ±0 (as peft's float mask)


def drop_random(tau: Tensor, density: float, generator: torch.Generator | np.random.Generator | None) -> Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability p = 1 − density, scale the kept ones by
    1/(1 − p), so the expected value of every entry is unchanged.

    Not peft's ``random_pruning`` (no generator argument, so not seedable per call) nor mergekit's
    ``bernoulli`` (its "rescale" matches the L1 norm of the kept entries instead of the paper's 1/(1 − p)).
    """
    _check_fraction("density", density)
    if density >= 1.0:
        return tau  # p = 0: nothing dropped, no random numbers drawn, bit-exact task arithmetic.
    return _drop_(tau.clone(), density, generator, None)


def _drop_(tau: Tensor, density: float, generator: Any, scratch: Scratch | None) -> Tensor:
    if density <= 0.0:
        return tau.zero_()
    # Keep an entry when its uniform draw r < density (density rounded to tau's dtype, as the comparison
    # rounds it): the same stream and the same mask bit for bit as bernoulli(full_like(tau, density)), one
    # uniform per entry (24 bits for float32, 53 for float64). density − r > 0 exactly when r < density (IEEE
    # subtraction keeps the sign), so sign then clamp give the 1.0 / 0.0 mask in float passes, no bool tensor.
    r = _uniform(tau, generator, _empty(scratch, "rand", tau, tau.dtype))
    keep = torch.sub(density, r, out=r).sign_().clamp_(min=0.0)
    return tau.mul_(keep).div_(density)


def _uniform(like: Tensor, generator: torch.Generator | np.random.Generator | None, out: Tensor) -> Tensor:
    """Uniform [0, 1) draws into ``out``, one per entry (24 random bits for float32, 53 for float64)."""
    if isinstance(generator, np.random.Generator):
        generator.random(dtype=np.float32 if out.dtype == torch.float32 else np.float64, out=out.numpy())
        return out
    return torch.rand(like.shape, generator=generator, dtype=like.dtype, out=out)


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
    if n_top + n_bot >= n:
        return torch.zeros_like(tau)  # everything is an outlier at one end or the other
    # Keep lo <= |τ| <= hi, the magnitudes of ranks n_bot + 1 (from the bottom) and n_top + 1 (from the top):
    # two selections instead of a sort. Magnitudes tied with a bound are all kept (a sort keeps some).
    mag = tau.abs()
    hi = kth_largest(mag, n_top + 1) if n_top else math.inf
    lo = kth_largest(mag, n - n_bot) if n_bot else 0.0
    return tau * ((mag >= lo) & (mag <= hi))


def _weighted_sum(taus: list[Tensor], weights: list[float], scratch: Scratch | None = None) -> Tensor:
    out = _empty(scratch, "sum", taus[0], taus[0].dtype).zero_()
    for tau, w in zip(taus, weights):
        out.add_(tau, alpha=w)
    return out


def _sign_consensus(taus: list[Tensor], weights: list[float], scratch: Scratch | None = None) -> Tensor:
    """TIES steps 2-3 on the weighted task vectors w_i·τ_i: elect the sign with the larger total magnitude,
    then average the entries that agree with it (zeros, i.e. trimmed or dropped entries, never count).
    Scales the given ``taus`` in place (callers pass their own).

    peft's arithmetic, model by model: Σ from a +0 accumulator is ``stacked.sum(0)`` bit for bit for up to 4
    models (checked; with 5 or more torch's reduction regroups the terms, so the stacked sum is used there).
    peft elects s = +1 where the sum is ≥ 0 (±0 included) else −1, and x agrees when sign(x) == s, i.e.
    x·s > 0; both are computed as float masks (sign passes, no bool tensors). Same bits as peft for finite
    task vectors; with NaN or infinite entries the results are not specified (peft's are NaN there too).
    """
    xs = [tau if w == 1.0 else tau.mul_(w) for tau, w in zip(taus, weights)]  # × 1 changes no bit
    total = _empty(scratch, "total", xs[0], xs[0].dtype)
    if len(xs) > 4:
        torch.sum(torch.stack(xs, dim=0), dim=0, out=total)
    else:  # x0 + x1 + ... rather than +0 + x0 + ...: they differ only in the sign of a zero sum, and both
        total.copy_(xs[0])  # signs of zero elect +1 (peft's `>= 0`)
        for x in xs[1:]:
            total.add_(x)
    elected = total.sign_().add_(0.5).sign_()  # +1 where the sum is >= 0, -1 where < 0
    count = _empty(scratch, "count", xs[0], xs[0].dtype)
    agree = _empty(scratch, "agree", xs[0], xs[0].dtype)
    mixed = _empty(scratch, "mixed", xs[0], xs[0].dtype)
    for i, x in enumerate(xs):
        a = count if i == 0 else agree  # the first mask is the first count
        torch.mul(x, elected, out=a).sign_().clamp_(min=0.0)  # 1.0 where x·s > 0, else 0.0
        if len(xs) > 4:
            x.mul_(a)  # x is ours (scaled above); summed in the stacked order below, for the same bits
        elif i == 0:
            torch.mul(x, a, out=mixed)
        else:
            mixed.addcmul_(x, a)  # x·a is exact (a is 0 or 1): one rounding, as in mixed + x·a
        if i > 0:
            count.add_(a)
    if len(xs) > 4:
        torch.sum(torch.stack(xs, dim=0), dim=0, out=mixed)
    else:  # peft sums from +0: + 0.0 turns a -0.0 (no model agrees, x0 < 0) into its +0.0; all else is equal
        mixed.add_(0.0)
    return mixed.div_(count.clamp_(min=1.0))


def _rebase(b: Tensor, lam: float, combined: Tensor) -> Tensor:
    """b + lam · combined, in place in ``combined`` (the same bits: IEEE addition is commutative)."""
    return (combined if lam == 1.0 else combined.mul_(lam)).add_(b)  # × 1 changes no bit


# --------------------------------------------------------------------------------------------- methods
# Every method also takes ``scratch`` (set by the stage, not by users): buffers for its temporaries.


@MERGE_METHODS.register("linear")
def linear(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
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
    out = _weighted_sum([t.to(wd) for t in tensors], [float(w) for w in weights], scratch)
    if normalize:
        total = math.fsum(float(w) for w in weights)
        if abs(total) < 1e-12:
            raise ValueError("linear merge with normalize=True needs weights that do not sum to 0")
        out = out.div_(total)
    return out


@MERGE_METHODS.register("task_arithmetic")
def task_arithmetic(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    lam: float = 1.0,
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"):
    θ = θ_base + lam · Σ w_i (θ_i − θ_base). Negative weights are task negation.

    Computed as (1 − Σ c_i)·θ_base + Σ c_i·θ_i with c_i = lam·w_i, the same sum regrouped: one accumulator
    and no task-vector tensors (a third of the memory passes), and one model at c = 1 gives that model bit
    for bit. Rounding differs from the τ form by an ulp or so of the weights' magnitude.
    """
    del generator
    _check(base, tensors, weights, needs_base=True)
    wd = _work_dtype(dtype)
    kept = [(t, lam * float(w)) for t, w in zip(tensors, weights) if float(w) != 0.0]
    if not kept or lam == 0:
        return _base_copy(base, dtype)
    out = torch.mul(kept[0][0].to(wd), kept[0][1], out=_empty(scratch, "sum", base, wd))
    for t, c in kept[1:]:
        out.add_(t, alpha=c)  # t in its own dtype: add_ widens it element by element, no converted copy
    base_coeff = 1.0 - math.fsum(c for _, c in kept)
    if base_coeff != 0.0:  # at 0 the add is skipped, so that -0.0 entries of a model stay -0.0
        out.add_(base, alpha=base_coeff)
    return out


@MERGE_METHODS.register("ties")
def ties(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    thresholds: list[float] | None = None,
    density: float = 0.2,
    lam: float = 1.0,
) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim each τ_i to its top-``density`` magnitudes, elect a sign per
    entry by total magnitude, take the disjoint mean of the agreeing entries, return θ_base + lam · τ_m.

    Departure: the paper has no per-model weights. Here TIES runs on the weighted vectors w_i·τ_i (weights
    all 1 is the paper). peft elects the sign on the unweighted vectors; mergekit divides by Σ w_i over the
    agreeing models instead of their count. Trimming is per tensor, the paper trims the whole task vector;
    magnitudes tied with the k-th largest are all kept (see :func:`trim_magnitude`). ``thresholds`` (one per
    model; set by the stage, not by users) are the trim magnitudes of the whole tensor when ``base`` and
    ``tensors`` are slices of it; None computes them from the tensors given.
    """
    del generator
    _check_fraction("density", density)
    b, taus, ws = _task_vectors(base, tensors, weights, dtype, scratch)
    if not taus or lam == 0:
        return _base_copy(base, dtype)
    if density < 1.0:
        for tau, limit in zip(taus, _per_model(thresholds, weights, "thresholds")):
            _trim_(tau, density, limit, scratch)
    return _rebase(b, lam, _sign_consensus(taus, ws, scratch))


@MERGE_METHODS.register("dare_linear")
def dare_linear(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | np.random.Generator | list | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    density: float = 0.1,
    lam: float = 1.0,
) -> Tensor:
    """DARE then task arithmetic (Yu et al. 2024, "Language Models are Super Mario"): each τ_i loses every
    entry with probability 1 − ``density`` and the rest are scaled by 1/``density``; then
    θ = θ_base + lam · Σ w_i τ̃_i. ``density=1`` is exactly task arithmetic. Pass a seeded ``generator`` (or
    one per model) for reproducible merges; the masks are drawn per tensor, in model order."""
    _check_fraction("density", density)
    if density >= 1.0:  # nothing dropped, no random numbers drawn: task arithmetic, bit for bit
        return task_arithmetic(base, tensors, weights, dtype=dtype, scratch=scratch, lam=lam)
    gens = _generators(generator, weights)
    b, taus, ws = _task_vectors(base, tensors, weights, dtype, scratch)
    if not taus or lam == 0:
        return _base_copy(base, dtype)
    dropped = [_drop_(tau, density, g, scratch) for tau, g in zip(taus, gens)]
    return _rebase(b, lam, _weighted_sum(dropped, ws, scratch))


@MERGE_METHODS.register("dare_ties")
def dare_ties(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | np.random.Generator | list | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    density: float = 0.1,
    lam: float = 1.0,
) -> Tensor:
    """DARE then TIES sign election and disjoint mean (Yu et al. 2024, the DARE + TIES-Merging setting).

    DARE's random drop replaces TIES's magnitude trim (as in mergekit and peft); the sign election and the
    disjoint mean run on w_i·τ̃_i, as in :func:`ties`.
    """
    _check_fraction("density", density)
    gens = _generators(generator, weights)
    b, taus, ws = _task_vectors(base, tensors, weights, dtype, scratch)
    if not taus or lam == 0:
        return _base_copy(base, dtype)
    if density < 1.0:
        for tau, g in zip(taus, gens):
            _drop_(tau, density, g, scratch)
    return _rebase(b, lam, _sign_consensus(taus, ws, scratch))


@MERGE_METHODS.register("breadcrumbs")
def breadcrumbs(
    base: Tensor | None,
    tensors: list[Tensor],
    weights: list[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
    beta: float = 0.01,
    gamma: float = 0.9,
    lam: float = 1.0,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): in each τ_i zero the ``beta`` fraction of largest and the
    ``gamma`` fraction of smallest magnitudes, then task arithmetic θ_base + lam · Σ w_i τ̂_i.

    Departure: the paper masks per layer; here per tensor (one tensor is all this function sees; the stage
    never slices it), and magnitudes tied with a bound are all kept (:func:`drop_outliers`). The defaults
    keep the middle 9% of magnitudes; tune ``beta`` and ``gamma`` per model family.
    """
    del generator
    _check(base, tensors, weights, needs_base=True)
    _check_fraction("beta", beta)
    _check_fraction("gamma", gamma)
    if _count_of(beta, base.numel()) == 0 and _count_of(gamma, base.numel()) == 0:
        return task_arithmetic(base, tensors, weights, dtype=dtype, lam=lam)  # nothing masked: the same bits
    b, taus, ws = _task_vectors(base, tensors, weights, dtype, scratch)
    if not taus or lam == 0:
        return _base_copy(base, dtype)
    masked = [drop_outliers(tau, beta, gamma) for tau in taus]
    return _rebase(b, lam, _weighted_sum(masked, ws, scratch))
