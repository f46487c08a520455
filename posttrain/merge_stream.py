"""One tensor of a merge, slice by slice: how the merge stage holds a few MB whatever the model's size.

For each tensor name the merge stage calls :func:`write_tensor`. A floating-point tensor is cut into slices
of ``SLICE`` elements (1 MiB of float32); each slice is read from every input with
``ShardedReader.read_flat`` into a buffer reused for the whole merge, merged by the registered method with a
:class:`Scratch` for its temporaries, and written with ``ShardedWriter.add_flat``.
The working set (~15 slice buffers) stays in the CPU caches, and nothing is allocated per slice.

Slicing gives the same bits as merging the whole tensor at once (tests/test_merge_stage.py checks it):

  * task arithmetic, linear: elementwise;
  * DARE: each model draws from its own generator, slice after slice, and a draw over [0, a) then [a, b) is
    the stream of one draw over [0, b) (checked for numpy's PCG64 and torch), so slicing leaves masks alone;
  * TIES: the trim threshold of each model (the k-th largest |τ_i| of the whole tensor, exact) is found
    first by :func:`trim_thresholds`, then passed with every slice; sign election and mean are elementwise.
    That reads every slice twice, so a tensor whose inputs fit CACHE_BYTES is read once, whole.

Breadcrumbs (two thresholds per model) takes the whole tensor at once.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import Tensor

from posttrain.merge_methods import _count_of, _work_dtype, kth_largest
from posttrain.tensors import ShardedReader, ShardedWriter

if TYPE_CHECKING:
    from posttrain.stages.merge import _Plan

__all__ = ["SLICE", "SLICED", "Scratch", "write_tensor", "trim_thresholds", "with_progress"]

# 2**18 elements: 1 MiB per float32 buffer. A TIES slice touches ~15 such buffers, which stay in L2/L3 (one
# pass over a 131 MB tensor from DRAM measured ~4x slower per element); 2**17 and 2**19 measured 3-10% slower
# on the benchmark's merges (more Python calls, or less cache).
SLICE = 1 << 18
SLICED = frozenset({"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"})
# TIES thresholds: a sample of SAMPLE entries brackets the k-th largest |τ| by ranks ± WINDOW_SIGMAS binomial
# standard deviations (+ 0.1% of the sample). The entries are evenly spaced with a spacing coprime to the row
# length, so they fall in every row and every column: weights whose rows or columns differ in scale (lognormal
# σ 1-2) missed the window in 3 of 8 tensors with 32 runs of 2048 entries, in none with this. From a tensor
# read whole they are a strided view; from the files, runs of SAMPLE_BLOCK entries (one read per run).
SAMPLE, SAMPLE_BLOCK, WINDOW_SIGMAS = 1 << 16, 64, 4.0
# TIES reads a tensor whose inputs together fit CACHE_BYTES once, whole, instead of slice by slice twice.
CACHE_BYTES = 48 * 2**20


class Scratch:
    """Reusable buffers for a method's temporaries, by name. The merge stage passes one Scratch to every
    slice of every tensor, so the ~10 temporaries of a TIES slice are allocated once per merge, not per
    slice: a fresh 1 MB block costs page faults (100-400 µs measured, as much as the math on it). A result
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


def with_progress(names: list[str], reader: ShardedReader, desc: str) -> Iterator[str]:
    """Yield `names` while a tqdm bar counts their bytes in `reader` (shown on a terminal only: tqdm's
    disable=None), so a merge or transfer of a large model says how far it is, as mergekit's does."""
    from tqdm.auto import tqdm

    sizes = [reader.numel(n) * reader.dtype(n).itemsize for n in names]
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        for name, size in zip(names, sizes):
            yield name
            bar.update(size)


def write_tensor(plan: _Plan, name: str, weights: list[float], gens: list[np.random.Generator],
                 writer: ShardedWriter, scratch: Scratch) -> None:
    """Merge tensor ``name`` of every input with ``weights`` (one per model) and write it to ``writer``."""
    ref = plan.ref
    dtype, n = ref.dtype(name), ref.numel(name)
    if not dtype.is_floating_point:
        writer.add(name, ref.get(name))  # integer buffers (position ids, counters) are not weights: the base's
        return
    kwargs: dict[str, Any] = dict(generator=gens, dtype=plan.dtype, scratch=scratch, **plan.params)
    base_arg = (lambda b: b) if plan.base is not None else (lambda b: None)
    if plan.method not in SLICED:
        src = _Source(plan, name, weights, scratch, whole=False)
        base, tensors = src.read(0, n)
        merged = plan.fn(base_arg(base), tensors, weights, **kwargs)
        writer.add(name, merged.to(dtype).reshape(ref.shape(name)))
        return
    two_passes = plan.method == "ties" and n > SLICE and kwargs.get("density", 0.2) < 1.0
    # TIES reads every slice twice (thresholds, then merge): a tensor that fits CACHE_BYTES is read once.
    src = _Source(plan, name, weights, scratch, whole=two_passes and src_bytes(plan, name) <= CACHE_BYTES)
    if two_passes:
        kwargs["thresholds"] = trim_thresholds(plan, src, kwargs.get("density", 0.2), scratch)
    for start in range(0, n, SLICE):
        stop = min(n, start + SLICE)
        base, tensors = src.slice(start, stop)
        merged = plan.fn(base_arg(base), tensors, weights, **kwargs)
        writer.add_flat(name, start, merged.to(dtype))


def src_bytes(plan: _Plan, name: str) -> int:
    return plan.ref.numel(name) * plan.ref.dtype(name).itemsize * (1 + len(plan.models))


class _Source:
    """Elements [start, stop) of tensor ``name`` from the base and every model, flattened. Task-vector methods
    leave zero-weight models out before any math, so those are not read (the base stands in for them).
    ``whole``: read each input once into a buffer and hand out views; else read every slice from the files."""

    def __init__(self, plan: _Plan, name: str, weights: list[float], scratch: Scratch, whole: bool):
        skip = plan.base is not None
        self.name, self.scratch, self.dtype = name, scratch, plan.ref.dtype(name)
        self.n, self.work = plan.ref.numel(name), _work_dtype(plan.dtype)
        self.np_work = np.float64 if self.work == torch.float64 else np.float32
        self.readers = [plan.ref, *(None if skip and w == 0.0 else r for r, w in zip(plan.models, weights))]
        self.active = [i for i, r in enumerate(self.readers[1:]) if r is not None]
        self.whole: list[Tensor | None] | None = None
        if whole:
            self.whole = [r.read_flat(name, 0, self.n, out=scratch.take(f"whole:{i}", (self.n,), self.dtype))
                          if r is not None else None for i, r in enumerate(self.readers)]

    def read(self, start: int, stop: int) -> tuple[Tensor, list[Tensor]]:
        """Fresh tensors (or views of the whole ones): for samples and unsliced merges."""
        if self.whole is not None:
            return self._views(start, stop)
        return _base_for_missing([r.read_flat(self.name, start, stop) if r is not None else None
                                  for r in self.readers])

    def slice(self, start: int, stop: int) -> tuple[Tensor, list[Tensor]]:
        """Views valid until the next call: slice buffers reused for every slice of every tensor."""
        if self.whole is not None:
            return self._views(start, stop)
        return _base_for_missing([
            r.read_flat(self.name, start, stop, out=self.scratch.take(f"in:{i}", (SLICE,), self.dtype))
            if r is not None else None for i, r in enumerate(self.readers)])

    def _views(self, start: int, stop: int) -> tuple[Tensor, list[Tensor]]:
        assert self.whole is not None
        return _base_for_missing([w[start:stop] if w is not None else None for w in self.whole])


def _base_for_missing(got: list[Tensor | None]) -> tuple[Tensor, list[Tensor]]:
    """(base, models) from [base, model...] read: a zero-weight model, not read, is given the base (τ = 0)."""
    return got[0], [g if g is not None else got[0] for g in got[1:]]


def trim_thresholds(plan: _Plan, src: _Source, density: float, scratch: Scratch) -> list[float]:
    """TIES's trim threshold for each model (the ``floor(density·n)``-th largest |θ_i − θ_base| of the whole
    tensor, exactly; see ``merge_methods.trim_threshold``) without holding the tensor.

    Sample, bracket, count, select: |τ_i| on a sample of the tensor gives a window [lo, hi] that holds the k-th
    largest with a margin of WINDOW_SIGMAS standard deviations of its sample rank; one pass over the slices
    counts the entries above hi and keeps those inside the window (~2-3% of them); the k-th largest is then
    the (k − above)-th largest of the window's entries. If the sample misled, the count says on which side of
    the window the k-th value lies, and a second pass keeps every entry on that side (up to 80% of the
    tensor's entries, for one model): slower, never inexact. Zero-weight models get ``inf`` (they are left
    out before any math).
    """
    k = _count_of(density, src.n)
    limits = [math.inf] * (len(src.readers) - 1)  # k == 0: nothing kept
    if k == 0 or not src.active:
        return limits
    windows = _windows(src, k / src.n, plan.ref.shape(src.name)[-1] if plan.ref.shape(src.name) else 1)
    above, inside = _count_pass(src, src.active, windows, scratch)
    for j, i in enumerate(src.active):
        need, cands = k - above[j], inside[j]
        if not 1 <= need <= cands.size:  # the window missed: keep every entry on the side of the k-th
            lo, hi = windows[j]
            side = (float(np.nextafter(src.np_work(hi), np.inf)), math.inf) if need < 1 else \
                (-math.inf, float(np.nextafter(src.np_work(lo), -np.inf)))
            above_side, inside_side = _count_pass(src, [i], [side], scratch)
            need, cands = k - above_side[0], inside_side[0]
        limits[i] = float(np.partition(cands, cands.size - need)[cands.size - need])
    return limits


def _windows(src: _Source, q: float, row: int) -> list[tuple[float, float]]:
    """[lo, hi] per active model around the sample's q-quantile from the top, ± WINDOW_SIGMAS·sqrt(m·q·(1−q))
    ranks (+ 0.1% of the sample and 2: slack for neighbouring entries being alike). ``row``: the row length."""
    n = src.n
    block = 1 if src.whole is not None else min(SAMPLE_BLOCK, n)
    spacing = max(block, n // max(1, SAMPLE // block))
    while math.gcd(spacing, row) != 1:  # coprime: run starts walk through every column
        spacing += 1
    if src.whole is not None:
        parts = [src.read(0, n)]
        parts = [(parts[0][0][::spacing], [m[::spacing] for m in parts[0][1]])]
    else:
        parts = [src.read(s, s + block) for s in range(0, n - block + 1, spacing)]
    base = torch.cat([b for b, _ in parts]).to(src.work)
    out = []
    for i in src.active:
        sample = torch.sub(torch.cat([ms[i] for _, ms in parts]), base).abs_()
        m = sample.numel()
        # Entries of one run share a row: from the files the margin doubles (a row-scale lognormal σ 1.5 missed).
        margin = (WINDOW_SIGMAS * math.sqrt(m * q * (1 - q)) + 0.001 * m + 2) * (1 if block == 1 else 2)
        r_hi, r_lo = math.floor(q * m - margin), math.ceil(q * m + margin)  # ranks from the top, 1-based
        hi = kth_largest(sample, min(r_hi, m)) if r_hi >= 1 else math.inf
        lo = kth_largest(sample, max(r_lo, 1)) if r_lo <= m else -math.inf
        out.append((lo, hi))
    return out


def _count_pass(src: _Source, active: list[int], windows: list[tuple[float, float]],
                scratch: Scratch) -> tuple[list[int], list[np.ndarray]]:
    """One pass over the slices: per model, the count of |τ| > hi and the entries with lo <= |τ| <= hi.
    |τ| has the bits that ties() computes for the same entries; numpy for the comparisons: ~10x faster than
    torch's into bool tensors (measured on one core)."""
    above = [0] * len(active)
    inside: list[list[np.ndarray]] = [[] for _ in active]
    over = np.empty(SLICE, dtype=bool)
    within = np.empty(SLICE, dtype=bool)
    for start in range(0, src.n, SLICE):
        stop = min(src.n, start + SLICE)
        base, models = src.slice(start, stop)
        base = base.to(src.work)
        for j, (i, (lo, hi)) in enumerate(zip(active, windows)):
            a = torch.sub(models[i], base, out=scratch.take("abs_tau", (stop - start,), src.work)).abs_().numpy()
            o, w = over[: a.size], within[: a.size]
            above[j] += int(np.count_nonzero(np.greater(a, hi, out=o)))
            np.logical_and(np.greater_equal(a, lo, out=w), np.logical_not(o, out=o), out=w)
            inside[j].append(a.take(np.flatnonzero(w)))  # a copy (the buffer is reused); 3x faster than a[w]
    return above, [np.concatenate(parts) for parts in inside]
