"""The arithmetic that merge methods share (posttrain.merging.methods): task vectors, TIES's trim and sign
consensus, DARE's drop, Breadcrumbs' outlier mask, exact k-th largest values, and the reusable buffers
(`Scratch`) a streamed merge computes in. How each departs from peft and mergekit is said where it does;
timings behind the choices: docs/notes/merging.md.

A method declares at registration how the stream may cut a tensor for it (`merge_method(name, streaming)`):

- ``SLICES``: any slice gives the bits the whole tensor would (elementwise math, one random stream per model);
- ``TRIM``: as SLICES once each model's trim threshold over the whole tensor (the k-th largest |τ| at the
  method's ``density``) is known; the stream computes the thresholds and passes them as ``thresholds``;
- ``ROWS``: as SLICES, but a slice holds whole rows (the last dimension; a 1-D tensor is one row): DELLA ranks
  magnitudes within each row. The stream passes the row length as ``row_length``;
- ``STATS``: as SLICES once statistics of the whole tensor are known: the method's ``stats`` function (given
  at registration) maps a slice to an array that adds up over slices; the stream sums it over the tensor in a
  first pass and passes the sum as ``stats`` (model_stock: the Gram matrix of the task vectors);
- ``WHOLE``: the method needs the whole tensor at once (a norm, an angle, ranks of magnitudes).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from posttrain.registry import MERGE_METHODS

SLICES, TRIM, ROWS, STATS, WHOLE = "slices", "trim", "rows", "stats", "whole"
STREAMING = (SLICES, TRIM, ROWS, STATS, WHOLE)


def merge_method(name: str, streaming: str, stats: Callable | None = None) -> Callable[[Callable], Callable]:
    """Register a merge method under ``name`` with how the stream may cut its tensors (one of STREAMING);
    a STATS method gives its ``stats(base, tensors, weights, dtype) -> np.ndarray`` function too."""
    if streaming not in STREAMING:
        raise ValueError(f"merge method {name!r}: streaming must be one of {', '.join(STREAMING)}, got {streaming!r}")
    if (streaming == STATS) != (stats is not None):
        raise ValueError(f"merge method {name!r}: a stats function goes with {STATS} streaming, and only with it")

    def deco(fn: Callable) -> Callable:
        fn.streaming = streaming  # type: ignore[attr-defined]
        fn.stats = stats  # type: ignore[attr-defined]
        return MERGE_METHODS.register(name, fn)

    return deco


class Scratch:
    """Reusable buffers for a method's temporaries, by name. The merge stage passes one Scratch to every
    slice of every tensor, so the ~10 temporaries of a TIES slice are allocated once per merge, not per
    slice: a fresh 1 MB block costs page faults, as much as the math on it. A result
    computed with a Scratch may live in one of its buffers: it is valid until the next call that uses it."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], Tensor] = {}
        self._views: dict[tuple[str, tuple[int, ...], torch.dtype], Tensor] = {}  # slices repeat one shape

    def take(self, key: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
        view = self._views.get((key, tuple(shape), dtype))
        if view is not None:
            return view
        n = math.prod(shape)
        buf = self._bufs.get((key, dtype))
        if buf is None or buf.numel() < n:
            buf = self._bufs[(key, dtype)] = torch.empty(n, dtype=dtype)
            self._views = {k: v for k, v in self._views.items() if k[0] != key or k[2] != dtype}
        view = self._views[(key, tuple(shape), dtype)] = buf[:n].view(shape)
        return view


def empty(scratch: Scratch | None, key: str, like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty(like.shape, dtype=dtype) if scratch is None else scratch.take(key, like.shape, dtype)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 only on request (exact-value tests, tiny models); everything else computes in float32 so that
    # bf16/fp16 inputs do not lose the small differences that task vectors are made of.
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensors(base: Tensor | None, tensors: list[Tensor], weights: list[float], needs_base: bool) -> None:
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


def task_vectors(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], dtype: torch.dtype,
    scratch: Scratch | None = None,
) -> tuple[Tensor, list[Tensor], list[float]]:
    """Return (base in the work dtype, τ_i for the models with nonzero weight, those weights). The τ_i are
    fresh (or scratch) tensors the caller may modify; the base may be the caller's tensor: read it only."""
    check_tensors(base, tensors, weights, needs_base=True)
    wd = work_dtype(dtype)
    b = base.to(wd)
    kept = [(t, float(w)) for t, w in zip(tensors, weights) if float(w) != 0.0]
    # torch.sub widens t to b's dtype element by element: the bits of t.to(wd) - b, without the copy.
    taus = [torch.sub(t, b, out=empty(scratch, f"tau{i}", b, wd)) for i, (t, _) in enumerate(kept)]
    return b, taus, [w for _, w in kept]


def base_copy(base: Tensor, dtype: torch.dtype) -> Tensor:
    return base.to(work_dtype(dtype), copy=True)  # a copy: the result must never alias the caller's base


def per_model(values: list | None, weights: list[float], what: str) -> list:
    """``values`` (one per model, or None) for the models with nonzero weight, in the order of task_vectors."""
    if values is None:
        return [None] * sum(float(w) != 0.0 for w in weights)
    if len(values) != len(weights):
        raise ValueError(f"{len(values)} {what} but {len(weights)} models")
    return [v for v, w in zip(values, weights) if float(w) != 0.0]


def per_model_values(value: float | list[float], weights: list[float], what: str) -> list[float]:
    """A method parameter given once (a number, for every model) or per model (a list, one value per entry of
    ``models:``, as mergekit's per-model ``parameters:``), for the models with nonzero weight."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(weights):
            raise ValueError(f"params.{what}: {len(value)} values but {len(weights)} models (one per model)")
        values = [float(v) for v in value]
    else:
        values = [float(value)] * len(weights)
    return [v for v, w in zip(values, weights) if float(w) != 0.0]


def generators_for(generator: torch.Generator | np.random.Generator | list | None, weights: list[float]) -> list:
    if isinstance(generator, (list, tuple)):
        return per_model(list(generator), weights, "generators")
    return per_model([generator] * len(weights), weights, "generators")  # one stream, drawn in model order


def check_fraction(what: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value}")


def count_of(fraction: float, n: int) -> int:
    # floor(fraction * n), but immune to float error: int(0.29 * 100) is 28 in IEEE arithmetic, this is 29.
    return min(n, max(0, math.floor(fraction * n + 1e-9)))


_NP = {torch.float32: np.float32, torch.float64: np.float64}


def kth_largest(values: Tensor, k: int) -> float:
    """The k-th largest of ``values`` (1 ≤ k ≤ numel), exactly: numpy's introselect (``np.partition``), faster
    than ``torch.kthvalue``, a sort or a top-k (docs/notes/merging.md)."""
    flat = values.detach().reshape(-1).cpu().numpy()
    return float(np.partition(flat, flat.size - k)[flat.size - k])


def trim_threshold(tau: Tensor, density: float) -> float:
    """The magnitude that TIES's trim keeps from: the ``floor(density · numel)``-th largest ``|τ|`` (``inf``
    when that count is 0: nothing is kept, unless a task vector holds infinities)."""
    k = count_of(density, tau.numel())
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
    check_fraction("density", density)
    return tau if density >= 1.0 else trim_(tau.clone(), density, threshold, None)


def trim_(tau: Tensor, density: float, threshold: float | None, scratch: Scratch | None) -> Tensor:
    if threshold is None:
        threshold = trim_threshold(tau, density)
    # keep = 1.0 where |τ| >= threshold, else 0.0, in three vectorised float passes (faster than torch's
    # comparison into a bool tensor and a multiply by it): threshold_ zeroes |τ| <= b, b the float just below
    # the threshold, and sign_ maps what is left to 1.0. A kept |τ| of 0 gives 0.0, which changes nothing.
    keep = torch.abs(tau, out=empty(scratch, "keep", tau, tau.dtype))
    below = float(np.nextafter(np.array(threshold, dtype=_NP[tau.dtype]), -np.inf))
    torch.threshold_(keep, below, 0.0).sign_()
    return tau.mul_(keep)  # × 1.0 keeps the bits, × 0.0 gives ±0 (as peft's float mask)


def drop_random(tau: Tensor, density: float, generator: torch.Generator | np.random.Generator | None) -> Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability p = 1 − density, scale the kept ones by
    1/(1 − p), so the expected value of every entry is unchanged.

    Not peft's ``random_pruning`` (no generator argument, so not seedable per call) nor mergekit's
    ``bernoulli`` (its "rescale" matches the L1 norm of the kept entries instead of the paper's 1/(1 − p)).
    """
    check_fraction("density", density)
    if density >= 1.0:
        return tau  # p = 0: nothing dropped, no random numbers drawn, bit-exact task arithmetic.
    return drop_(tau.clone(), density, generator, None)


def drop_(tau: Tensor, density: float, generator: Any, scratch: Scratch | None) -> Tensor:
    if density <= 0.0:
        return tau.zero_()
    # Keep an entry when its uniform draw r < density (density rounded to tau's dtype, as the comparison
    # rounds it): the same stream and the same mask bit for bit as bernoulli(full_like(tau, density)), one
    # uniform per entry (24 bits for float32, 53 for float64). density − r > 0 exactly when r < density (IEEE
    # subtraction keeps the sign), so sign then clamp give the 1.0 / 0.0 mask in float passes, no bool tensor.
    r = _uniform(tau, generator, empty(scratch, "rand", tau, tau.dtype))
    keep = torch.sub(density, r, out=r).sign_().clamp_(min=0.0)
    return tau.mul_(keep).div_(density)


def _uniform(like: Tensor, generator: torch.Generator | np.random.Generator | None, out: Tensor) -> Tensor:
    """Uniform [0, 1) draws into ``out``, one per entry (24 random bits for float32, 53 for float64)."""
    if isinstance(generator, np.random.Generator):
        generator.random(dtype=np.float32 if out.dtype == torch.float32 else np.float64, out=out.numpy())
        return out
    return torch.rand(like.shape, generator=generator, dtype=like.dtype, out=out)


def magprune_(tau: Tensor, row_length: int, density: float, epsilon: float, generator: Any,
              scratch: Scratch | None) -> Tensor:
    """DELLA's MagPrune (Deep et al. 2024), in place, in mergekit's parameters: within each row (``row_length``
    consecutive entries) the entry of magnitude rank r (0 for the smallest, stable: ties by position) is kept
    with probability k_r = density − ε + 2ε·r/(n − 1) (n the row length; density for a row of one entry) and
    a kept entry is scaled by 1/k_r, so its expected value is unchanged (the paper's 1/(1 − p_i), p_i = 1 − k_r
    the drop probability). One uniform draw per entry, in order, as DARE's (:func:`drop_`): a stream cut at
    row boundaries draws what the whole tensor would.

    Departures: the paper's ε is the width of the drop probabilities' range, mergekit's (followed here) the
    half-width; mergekit 0.1's ``rescale`` matches the L1 norm of the kept entries instead of 1/k_r (its
    first DELLA version, by the paper's authors, divided by k_r as here), and its ranks break ties in
    magnitude in an unspecified order.
    """
    keep_p = row_ranks(tau.abs(), row_length)
    if row_length > 1:
        keep_p.mul_(2.0 * epsilon / (row_length - 1)).add_(density - epsilon)
    else:
        keep_p.fill_(density)
    keep_p = keep_p.view(tau.shape)
    r = _uniform(tau, generator, empty(scratch, "rand", tau, tau.dtype))
    keep = torch.sub(keep_p, r, out=r).sign_().clamp_(min=0.0)  # 1.0 where r < k (as drop_), else 0.0
    return tau.mul_(keep).div_(keep_p)


def row_ranks(mag: Tensor, row_length: int) -> Tensor:
    """The rank of each entry of ``mag`` (≥ 0) within its row of ``row_length``: 0 for the smallest, ties in
    the order of position (a stable sort), as floats of ``mag``'s dtype, shaped [rows, row_length].

    float32 sorts keys (the value's bits, which order non-negative floats as their values, above the position)
    with numpy's vectorised int64 sort instead of a stable argsort: the same order (the keys are unique) in a
    fifth of the time (docs/notes/merging.md)."""
    rows = mag.reshape(-1, row_length)
    if rows.dtype == torch.float32:
        keys = rows.numpy().view(np.int32).astype(np.int64)
        keys <<= 32
        keys |= np.arange(row_length, dtype=np.int64)
        keys.sort(axis=1)
        order = torch.from_numpy(keys.__iand__(0xFFFFFFFF))
    else:
        order = torch.argsort(rows, dim=1, stable=True)
    ranks = torch.arange(row_length, dtype=rows.dtype).expand_as(order)
    return torch.empty_like(rows).scatter_(1, order, ranks)


def drop_outliers(tau: Tensor, beta: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask (Davari & Belilovsky 2024): zero the ``beta`` fraction of entries with the
    largest magnitude and the ``gamma`` fraction with the smallest; keep the middle.

    Not mergekit's ``magnitude_outliers``: it is parameterised by density and a top fraction, and with a top
    count of 0 its slice ``indices[n_bot:-0]`` is empty, which zeroes the whole tensor.
    """
    check_fraction("beta", beta)
    check_fraction("gamma", gamma)
    n = tau.numel()
    n_top, n_bot = count_of(beta, n), count_of(gamma, n)
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


def weighted_sum(taus: list[Tensor], weights: list[float], scratch: Scratch | None = None) -> Tensor:
    out = empty(scratch, "sum", taus[0], taus[0].dtype).zero_()
    for tau, w in zip(taus, weights):
        out.add_(tau, alpha=w)
    return out


NORMALIZE = ("count", "weights", "none")


def check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")


def sign_consensus(taus: list[Tensor], weights: list[float], scratch: Scratch | None = None,
                   normalize: str = "count") -> Tensor:
    """TIES steps 2-3 on the weighted task vectors w_i·τ_i: elect the sign with the larger total magnitude,
    then average the entries that agree with it (zeros, i.e. trimmed or dropped entries, never count).
    Scales the given ``taus`` in place (callers pass their own).

    ``normalize`` says what the sum of the agreeing w_i·τ_i is divided by: ``count``, the number of agreeing
    models (the paper's disjoint mean, peft); ``weights``, the sum of their weights (mergekit's
    ``normalize: true``; a sum of 0 divides by 1); ``none``, nothing (mergekit's ``normalize: false``).

    peft's arithmetic, model by model: Σ from a +0 accumulator is ``stacked.sum(0)`` bit for bit for up to 4
    models (checked; with 5 or more torch's reduction regroups the terms, so the stacked sum is used there).
    peft elects s = +1 where the sum is ≥ 0 (±0 included) else −1, and x agrees when sign(x) == s, i.e.
    x·s > 0; both are computed as float masks (sign passes, no bool tensors). Same bits as peft for finite
    task vectors; with NaN or infinite entries the results are not specified (peft's are NaN there too).
    """
    xs = [tau if w == 1.0 else tau.mul_(w) for tau, w in zip(taus, weights)]  # × 1 changes no bit
    total = empty(scratch, "total", xs[0], xs[0].dtype)
    if len(xs) > 4:
        torch.sum(torch.stack(xs, dim=0), dim=0, out=total)
    else:  # x0 + x1 + ... rather than +0 + x0 + ...: they differ only in the sign of a zero sum, and both
        total.copy_(xs[0])  # signs of zero elect +1 (peft's `>= 0`)
        for x in xs[1:]:
            total.add_(x)
    elected = total.sign_().add_(0.5).sign_()  # +1 where the sum is >= 0, -1 where < 0
    count = empty(scratch, "count", xs[0], xs[0].dtype)
    agree = empty(scratch, "agree", xs[0], xs[0].dtype)
    mixed = empty(scratch, "mixed", xs[0], xs[0].dtype)
    for i, x in enumerate(xs):
        a = count if i == 0 else agree  # the first mask is the first count
        torch.mul(x, elected, out=a).sign_().clamp_(min=0.0)  # 1.0 where x·s > 0, else 0.0
        if len(xs) > 4:
            x.mul_(a)  # x is ours (scaled above); summed in the stacked order below, for the same bits
        elif i == 0:
            torch.mul(x, a, out=mixed)
        else:
            mixed.addcmul_(x, a)  # x·a is exact (a is 0 or 1): one rounding, as in mixed + x·a
        if normalize == "weights" and i == 0:  # count holds Σ w_i of the agreeing models (a is 0 or 1)
            count.mul_(weights[0])
        elif normalize == "weights":
            count.add_(a, alpha=weights[i])
        elif i > 0:
            count.add_(a)
    if len(xs) > 4:
        torch.sum(torch.stack(xs, dim=0), dim=0, out=mixed)
    else:  # peft sums from +0: + 0.0 turns a -0.0 (no model agrees, x0 < 0) into its +0.0; all else is equal
        mixed.add_(0.0)
    if normalize == "none":
        return mixed
    if normalize == "weights":
        return mixed.div_(count.masked_fill_(count == 0, 1.0))  # mergekit: a divisor of 0 becomes 1
    return mixed.div_(count.clamp_(min=1.0))


def rebase(b: Tensor, lam: float, combined: Tensor) -> Tensor:
    """b + lam · combined, in place in ``combined`` (the same bits: IEEE addition is commutative)."""
    return (combined if lam == 1.0 else combined.mul_(lam)).add_(b)  # × 1 changes no bit


def transfer_tensor(target: Tensor, source_base: Tensor, source_finetuned: Tensor, scale: float, *,
                    rows: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fine-tuning transfer of one tensor (Lin et al. 2025): ``target + scale·(source_finetuned − source_base)``.

    The diff and the sum are computed in `dtype`, the result cast to the target's dtype. `rows` (vocabulary
    tensors, shape [V_target]) gives for each target row the source row whose diff it takes, −1 for none (a
    zero diff). λ = 0 and non-float tensors (integer buffers) return the target unchanged, bit for bit.
    """
    if scale == 0.0 or not target.is_floating_point():
        return target
    delta = source_finetuned.to(dtype) - source_base.to(dtype)  # [V_source, H] for vocabulary tensors
    if rows is not None:
        delta = delta.index_select(0, rows.clamp(min=0))  # [V_target, H]
        delta[rows < 0] = 0
    return (target.to(dtype) + scale * delta).to(target.dtype)
