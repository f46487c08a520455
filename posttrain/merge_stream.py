"""One tensor of a merge, slice by slice: how the merge stage holds a few MB whatever the model's size.

For each tensor name the merge stage calls :func:`write_tensor`. A floating-point tensor is cut into slices
of ``SLICE`` elements (1 MiB of float32); each slice is read from every input with
``ShardedReader.read_flat`` into a buffer reused for the whole merge, merged by the registered method with a
:class:`~posttrain.merge_methods.Scratch` for its temporaries, and written with ``ShardedWriter.add_flat``.
The working set (~15 slice buffers) stays in the CPU caches, and nothing is allocated per slice.

Slicing gives the same bits as merging the whole tensor at once (tests/test_merge_stage.py checks it):

  * task arithmetic, linear: elementwise;
  * DARE: each model draws from its own generator, slice after slice, and ``torch.rand`` over [0, a) then
    [a, b) is the stream of one draw over [0, b) (checked), so a model's mask does not depend on the slicing;
  * TIES: the trim threshold of each model (the k-th largest |τ_i| of the whole tensor, exact) is found
    first by :func:`trim_thresholds`, then passed with every slice; sign election and mean are elementwise.

Breadcrumbs (two thresholds per model) takes the whole tensor at once.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from posttrain.merge_methods import Scratch, _count_of, _work_dtype, kth_largest
from posttrain.tensors import ShardedReader, ShardedWriter

if TYPE_CHECKING:
    from posttrain.stages.merge import _Plan

__all__ = ["SLICE", "SLICED", "write_tensor", "trim_thresholds"]

# 2**18 elements: 1 MiB per float32 buffer. A TIES slice touches ~15 such buffers, which stay in L2/L3; slices
# of 16 MB measured 3-4x slower per element (every pass goes to DRAM), slices of 64 KB pay Python per call.
SLICE = 1 << 18
SLICED = frozenset({"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"})
# TIES thresholds: a sample of SAMPLE_BLOCKS evenly spaced blocks of SAMPLE_BLOCK elements brackets the k-th
# largest |τ| by ranks ± WINDOW_SIGMAS binomial standard deviations (plus slack for blocks being correlated).
SAMPLE_BLOCKS, SAMPLE_BLOCK, WINDOW_SIGMAS = 64, 512, 6.0


def write_tensor(plan: _Plan, name: str, weights: list[float], gens: list[torch.Generator],
                 writer: ShardedWriter, scratch: Scratch) -> None:
    """Merge tensor ``name`` of every input with ``weights`` (one per model) and write it to ``writer``."""
    ref = plan.ref
    dtype, n = ref.dtype(name), ref.numel(name)
    if not dtype.is_floating_point:
        writer.add(name, ref.get(name))  # integer buffers (position ids, counters) are not weights: the base's
        return
    # Task-vector methods leave zero-weight models out before any math, so those are not even read.
    skip = plan.base is not None
    kwargs: dict[str, Any] = dict(generator=gens, dtype=plan.dtype, scratch=scratch, **plan.params)
    if plan.method not in SLICED:
        base = ref.get(name)
        tensors = [base if skip and w == 0 else r.get(name) for r, w in zip(plan.models, weights)]
        merged = plan.fn(base if plan.base is not None else None, tensors, weights, **kwargs)
        writer.add(name, merged.to(dtype).reshape(ref.shape(name)))
        return
    if plan.method == "ties" and n > SLICE:
        kwargs["thresholds"] = trim_thresholds(plan, name, weights, kwargs.get("density", 0.2), scratch)
    for start in range(0, n, SLICE):
        stop = min(n, start + SLICE)
        base = ref.read_flat(name, start, stop, out=scratch.take("in:base", (SLICE,), dtype))
        tensors = [base if skip and w == 0 else
                   r.read_flat(name, start, stop, out=scratch.take(f"in:{i}", (SLICE,), dtype))
                   for i, (r, w) in enumerate(zip(plan.models, weights))]
        merged = plan.fn(base if plan.base is not None else None, tensors, weights, **kwargs)
        writer.add_flat(name, start, merged.to(dtype))


def trim_thresholds(plan: _Plan, name: str, weights: list[float], density: float,
                    scratch: Scratch) -> list[float] | None:
    """TIES's trim threshold for each model (the ``floor(density·n)``-th largest |θ_i − θ_base| of the whole
    tensor, exactly; see ``merge_methods.trim_threshold``) without holding the tensor.

    Sample, bracket, count, select: |τ_i| on a sample of the tensor gives a window [lo, hi] that holds the k-th
    largest with a margin of WINDOW_SIGMAS standard deviations of its sample rank; one pass over the slices
    counts the entries above hi and keeps those inside the window (~2-3% of them); the k-th largest is then
    the (k − above)-th largest of the window's entries. If the sample misled (the count shows the k-th value
    outside the window) the pass is redone over the whole range: slower, never inexact. None when there is
    nothing to trim (density 1); unused entries for zero-weight models.
    """
    ref, n = plan.ref, plan.ref.numel(name)
    k = _count_of(density, n)
    if density >= 1.0:
        return None
    active = [i for i, w in enumerate(weights) if w != 0.0]
    limits = [math.inf] * len(weights)  # k == 0: nothing kept
    if k == 0 or not active:
        return limits
    windows = _windows(plan, name, active, k / n)
    above, inside = _count_pass(plan, name, active, windows, scratch)
    for j, i in enumerate(active):
        need, cands = k - above[j], inside[j]
        if not 1 <= need <= cands.size:  # the window missed: count and keep everything
            above_all, inside_all = _count_pass(plan, name, [i], [(-math.inf, math.inf)], scratch)
            need, cands = k - above_all[0], inside_all[0]
        limits[i] = float(np.partition(cands, cands.size - need)[cands.size - need])
    return limits


def _abs_tau(plan: _Plan, reader: ShardedReader, name: str, base: Tensor, start: int, stop: int,
             scratch: Scratch, key: str) -> Tensor:
    """|θ_i − θ_base| on [start, stop) in the work dtype: the bits that ties() computes for the same entries."""
    t = reader.read_flat(name, start, stop, out=scratch.take(key, (SLICE,), reader.dtype(name)))
    return torch.sub(t, base, out=scratch.take("abs_tau", (stop - start,), base.dtype)).abs_()


def _windows(plan: _Plan, name: str, active: list[int], q: float) -> list[tuple[float, float]]:
    """[lo, hi] per model around the sample's q-quantile from the top, ± WINDOW_SIGMAS·sqrt(m·q·(1−q)) ranks."""
    n = plan.ref.numel(name)
    block = min(SAMPLE_BLOCK, max(1, n // SAMPLE_BLOCKS))
    starts = sorted({(n - block) * j // max(1, SAMPLE_BLOCKS - 1) for j in range(SAMPLE_BLOCKS)})
    base = torch.cat([plan.ref.read_flat(name, s, s + block) for s in starts]).to(_work_dtype(plan.dtype))
    out = []
    for i in active:
        model = torch.cat([plan.models[i].read_flat(name, s, s + block) for s in starts])
        sample = torch.sub(model, base).abs_().numpy()
        m = sample.size
        margin = WINDOW_SIGMAS * math.sqrt(m * q * (1 - q)) + 0.002 * m + 2
        r_hi, r_lo = math.floor(q * m - margin), math.ceil(q * m + margin)  # ranks from the top, 1-based
        hi = kth_largest(torch.from_numpy(sample), min(r_hi, m)) if r_hi >= 1 else math.inf
        lo = kth_largest(torch.from_numpy(sample), max(r_lo, 1)) if r_lo <= m else -math.inf
        out.append((lo, hi))
    return out


def _count_pass(plan: _Plan, name: str, active: list[int], windows: list[tuple[float, float]],
                scratch: Scratch) -> tuple[list[int], list[np.ndarray]]:
    """One pass over the slices: per model, the count of |τ| > hi and the entries with lo <= |τ| <= hi.
    numpy for the comparisons: ~10x faster than torch's into bool tensors (measured on one core)."""
    n, dtype = plan.ref.numel(name), plan.ref.dtype(name)
    above = [0] * len(active)
    inside: list[list[np.ndarray]] = [[] for _ in active]
    over = np.empty(SLICE, dtype=bool)
    within = np.empty(SLICE, dtype=bool)
    for start in range(0, n, SLICE):
        stop = min(n, start + SLICE)
        base = plan.ref.read_flat(name, start, stop, out=scratch.take("in:base", (SLICE,), dtype))
        base = base.to(_work_dtype(plan.dtype))
        for j, (i, (lo, hi)) in enumerate(zip(active, windows)):
            a = _abs_tau(plan, plan.models[i], name, base, start, stop, scratch, f"in:{i}").numpy()
            o, w = over[: a.size], within[: a.size]
            above[j] += int(np.count_nonzero(np.greater(a, hi, out=o)))
            np.logical_and(np.greater_equal(a, lo, out=w), np.logical_not(o, out=o), out=w)
            inside[j].append(a[w])  # a copy: the slice buffer is reused
    return above, [np.concatenate(parts) for parts in inside]
