"""One tensor of a merge, slice by slice: how the merge stage holds a few MB whatever the model's size.

For each tensor name the merge stage calls :func:`write_tensor`. A floating-point tensor is cut into slices
of ``SLICE`` elements (1 MiB of float32); each slice is read from every input with
``ShardedReader.read_flat`` into a buffer reused for the whole merge, merged by the registered method with a
:class:`~posttrain.merging.ops.Scratch` for its temporaries, and written with ``ShardedWriter.add_flat``.
The working set (~15 slice buffers) stays in the CPU caches, and nothing is allocated per slice.

How a tensor is cut is what its method declared at registration (posttrain.merging.ops), never its name:

  * ``SLICES`` (linear, task arithmetic, DARE): slice by slice. DARE's generators draw slice after slice, and
    a draw over [0, a) then [a, b) is the stream of one draw over [0, b), so slicing leaves masks alone;
  * ``TRIM`` (TIES): each model's trim threshold (the k-th largest |τ_i| of the whole tensor, exact) is found
    first by :func:`trim_thresholds`, then passed with every slice. That reads every slice twice, so a tensor
    whose inputs fit CACHE_BYTES is read once, whole;
  * ``ROWS`` (DELLA): slices of whole rows (as many as fit SLICE, at least one), the row length passed as
    ``row_length``; the generators draw as for DARE, so slicing leaves DELLA's masks alone too;
  * ``STATS`` (model_stock): a first pass sums the method's ``stats`` over SLICE-sized slices (the Gram matrix
    of the task vectors), then every slice is merged with the sum. Read once, whole, under CACHE_BYTES;
  * ``WHOLE`` (Breadcrumbs, SLERP): the whole tensor at once.

Slicing gives the same bits as merging the whole tensor at once (tests/test_merge_stage.py checks it), except
for STATS, whose float sums over slices round as the slices fall (the same bits for a tensor of one slice). The
measurements behind SLICE, SAMPLE and CACHE_BYTES: docs/notes/merging.md.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from posttrain.merging.compat import coefficients_for
from posttrain.merging.ops import ROWS, SLICES, STATS, TRIM, Scratch, count_of, kth_largest, work_dtype
from posttrain.merging.search import Coefficients
from posttrain.tensor_writer import ShardedWriter
from posttrain.tensors import INDEX_FILE, ShardedReader

__all__ = ["SLICE", "MergePlan", "model_generators", "write_merge", "write_tensor", "trim_thresholds", "with_progress",
           "copy_base_files"]

# 2**18 elements: 1 MiB per float32 buffer; a TIES slice's ~15 such buffers stay in L2/L3.
SLICE = 1 << 18
# TRIM thresholds: a sample of SAMPLE entries brackets the k-th largest |τ| by ranks ± WINDOW_SIGMAS binomial
# standard deviations (+ 0.1% of the sample). The entries are evenly spaced with a spacing coprime to the row
# length, so they fall in every row and every column (weights whose rows or columns differ in scale). From a
# tensor read whole they are a strided view; from the files, runs of SAMPLE_BLOCK entries (one read per run).
SAMPLE, SAMPLE_BLOCK, WINDOW_SIGMAS = 1 << 16, 64, 4.0
# TRIM reads a tensor whose inputs together fit CACHE_BYTES once, whole, instead of slice by slice twice.
CACHE_BYTES = 48 * 2**20


@dataclass
class MergePlan:
    """Everything one merge needs except the coefficients (a search writes several merges from one plan)."""

    method: str
    fn: Callable  # a registered merge method (its `streaming` says how to cut a tensor for it)
    params: dict[str, Any]
    dtype: torch.dtype  # math
    seed: int
    max_shard_bytes: int
    ref: ShardedReader  # names, output dtypes and non-float tensors come from here (the base)
    base: ShardedReader | None  # None for linear, which ignores the base
    models: list[ShardedReader]
    files_from: Path

    def close(self) -> None:
        for r in {id(r): r for r in [self.ref, *([self.base] if self.base else []), *self.models]}.values():
            r.close()


def model_generators(seed: int, n_models: int) -> list[np.random.Generator]:
    """One generator per model for the DARE masks: numpy PCG64 streams spawned from ``SeedSequence(seed)``
    (independent by construction), each running on tensor after tensor, slice after slice."""
    return [np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(n_models)]


def write_merge(plan: MergePlan, coeffs: Coefficients, out: Path) -> None:
    """Stream every tensor through the method into `out` (written as a partial folder, renamed when complete).

    Each model's generator (:func:`model_generators`) draws its DARE masks tensor by tensor in sorted-name
    order, so the same seed gives the same merge whatever the sharding of the inputs and the slicing.
    """
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    gens = model_generators(plan.seed, len(plan.models))
    scratch = Scratch()  # the slice buffers, reused by every tensor
    try:
        # The layout lets the writer put each tensor straight into its shard file: no shard is held in memory.
        with ShardedWriter(partial, max_shard_bytes=plan.max_shard_bytes, layout=plan.ref.layout()) as writer:
            for name in with_progress(plan.ref.names(), plan.ref, "merge"):
                weights = coefficients_for(name, coeffs.weights, coeffs.per_block)
                write_tensor(plan, name, weights, gens, writer, scratch)
        copy_base_files(plan.files_from, partial)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


# Files copied from the base next to the merged weights: config, generation config, tokenizer and template.
BASE_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
              "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*", "*.tiktoken", "spiece.model")


def copy_base_files(src: Path, dst: Path, overwrite: bool = True, only_tokenizer: bool = False) -> None:
    patterns = [p for p in BASE_FILES if not (only_tokenizer and p.endswith("config.json"))]
    for p in sorted(src.iterdir()):
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns) and p.name != INDEX_FILE:
            if overwrite or not (dst / p.name).exists():
                shutil.copy2(p, dst / p.name)


def with_progress(names: list[str], reader: ShardedReader, desc: str) -> Iterator[str]:
    """Yield `names` while a tqdm bar counts their bytes in `reader` (shown on a terminal only: tqdm's
    disable=None), so a merge or transfer of a large model says how far it is, as mergekit's does."""
    from tqdm.auto import tqdm

    sizes = [reader.numel(n) * reader.dtype(n).itemsize for n in names]
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        for name, size in zip(names, sizes):
            yield name
            bar.update(size)


def write_tensor(plan: MergePlan, name: str, weights: list[float], gens: list[np.random.Generator],
                 writer: ShardedWriter, scratch: Scratch) -> None:
    """Merge tensor ``name`` of every input with ``weights`` (one per model) and write it to ``writer``."""
    ref = plan.ref
    dtype, n = ref.dtype(name), ref.numel(name)
    if not dtype.is_floating_point:
        writer.add(name, ref.get(name))  # integer buffers (position ids, counters) are not weights: the base's
        return
    kwargs: dict[str, Any] = dict(generator=gens, dtype=plan.dtype, scratch=scratch, **plan.params)
    base_arg = (lambda b: b) if plan.base is not None else (lambda b: None)
    streaming = plan.fn.streaming
    if streaming not in (SLICES, TRIM, ROWS, STATS):
        src = _Source(plan, name, weights, scratch, whole=False)
        base, tensors = src.read(0, n)
        merged = plan.fn(base_arg(base), tensors, weights, **kwargs)
        writer.add(name, merged.to(dtype).reshape(ref.shape(name)))
        return
    step = SLICE
    if streaming == ROWS:  # whole rows per slice: the last dimension (a 1-D tensor is one row)
        shape = ref.shape(name)
        kwargs["row_length"] = row = shape[-1] if len(shape) >= 2 and shape[-1] > 0 else max(n, 1)
        step = max(1, SLICE // row) * row
    densities = _densities(plan, kwargs, len(weights)) if streaming == TRIM else [1.0]
    two_passes = (n > SLICE and min(densities) < 1.0) or streaming == STATS
    # TRIM and STATS read every slice twice (a first pass, then the merge): a tensor that fits CACHE_BYTES is
    # read once, whole.
    src = _Source(plan, name, weights, scratch, whole=two_passes and src_bytes(plan, name) <= CACHE_BYTES)
    if two_passes and streaming == TRIM:
        kwargs["thresholds"] = trim_thresholds(plan, src, densities, scratch)
    if streaming == STATS and n > 0:
        kwargs["stats"] = sum(plan.fn.stats(base_arg(b), ts, weights, plan.dtype, scratch)
                              for b, ts in (src.slice(a, min(n, a + SLICE)) for a in range(0, n, SLICE)))
    for start in range(0, n, step):
        stop = min(n, start + step)
        base, tensors = src.slice(start, stop)
        merged = plan.fn(base_arg(base), tensors, weights, **kwargs)
        writer.add_flat(name, start, merged.to(dtype))


def _densities(plan: MergePlan, kwargs: dict[str, Any], n_models: int) -> list[float]:
    """A TRIM method's ``density``, one per model (a number given once applies to every model)."""
    density = kwargs.get("density", _default(plan.fn, "density"))
    return [float(d) for d in density] if isinstance(density, (list, tuple)) else [float(density)] * n_models


def _default(fn: Callable, param: str) -> Any:
    """The default of a method's keyword parameter (a TRIM method's ``density``)."""
    return inspect.signature(fn).parameters[param].default


def src_bytes(plan: MergePlan, name: str) -> int:
    return plan.ref.numel(name) * plan.ref.dtype(name).itemsize * (1 + len(plan.models))


class _Source:
    """Elements [start, stop) of tensor ``name`` from the base and every model, flattened. Task-vector methods
    leave zero-weight models out before any math, so those are not read (the base stands in for them).
    ``whole``: read each input once into a buffer and hand out views; else read every slice from the files."""

    def __init__(self, plan: MergePlan, name: str, weights: list[float], scratch: Scratch, whole: bool):
        skip = plan.base is not None
        self.name, self.scratch, self.dtype = name, scratch, plan.ref.dtype(name)
        self.n, self.work = plan.ref.numel(name), work_dtype(plan.dtype)
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
        size = (max(SLICE, stop - start),)  # ROWS slices may hold more: one row longer than SLICE
        return _base_for_missing([
            r.read_flat(self.name, start, stop, out=self.scratch.take(f"in:{i}", size, self.dtype))
            if r is not None else None for i, r in enumerate(self.readers)])

    def _views(self, start: int, stop: int) -> tuple[Tensor, list[Tensor]]:
        assert self.whole is not None
        return _base_for_missing([w[start:stop] if w is not None else None for w in self.whole])


def _base_for_missing(got: list[Tensor | None]) -> tuple[Tensor, list[Tensor]]:
    """(base, models) from [base, model...] read: a zero-weight model, not read, is given the base (τ = 0)."""
    return got[0], [g if g is not None else got[0] for g in got[1:]]


def trim_thresholds(plan: MergePlan, src: _Source, densities: list[float], scratch: Scratch) -> list[float]:
    """TIES's trim threshold for each model (the ``floor(density·n)``-th largest |θ_i − θ_base| of the whole
    tensor, exactly; see ``posttrain.merging.ops.trim_threshold``) without holding the tensor.

    Sample, bracket, count, select: |τ_i| on a sample of the tensor gives a window [lo, hi] that holds the k-th
    largest with a margin of WINDOW_SIGMAS standard deviations of its sample rank; one pass over the slices
    counts the entries above hi and keeps those inside the window (~2-3% of them); the k-th largest is then
    the (k − above)-th largest of the window's entries. If the sample misled, the count says on which side of
    the window the k-th value lies, and a second pass keeps every entry on that side (up to 80% of the
    tensor's entries, for one model): slower, never inexact. Zero-weight models get ``inf`` (they are left
    out before any math), and so do models with density 1 (not trimmed) or k = 0 (nothing kept).
    ``densities``: one per model.
    """
    limits = [math.inf] * (len(src.readers) - 1)
    ks = {i: count_of(densities[i], src.n) for i in src.active if densities[i] < 1.0}
    todo = [i for i, k in ks.items() if k > 0]
    if not todo:
        return limits
    shape = plan.ref.shape(src.name)
    windows = _windows(src, todo, [ks[i] / src.n for i in todo], shape[-1] if shape else 1)
    above, inside = _count_pass(src, todo, windows, scratch)
    for j, i in enumerate(todo):
        need, cands = ks[i] - above[j], inside[j]
        if not 1 <= need <= cands.size:  # the window missed: keep every entry on the side of the k-th
            lo, hi = windows[j]
            side = (float(np.nextafter(src.np_work(hi), np.inf)), math.inf) if need < 1 else \
                (-math.inf, float(np.nextafter(src.np_work(lo), -np.inf)))
            above_side, inside_side = _count_pass(src, [i], [side], scratch)
            need, cands = ks[i] - above_side[0], inside_side[0]
        limits[i] = float(np.partition(cands, cands.size - need)[cands.size - need])
    return limits


def _windows(src: _Source, active: list[int], qs: list[float], row: int) -> list[tuple[float, float]]:
    """[lo, hi] per model of ``active`` around the sample's q-quantile from the top (its q of ``qs``),
    ± WINDOW_SIGMAS·sqrt(m·q·(1−q)) ranks (+ 0.1% of the sample and 2: slack for neighbouring entries being
    alike). ``row``: the row length."""
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
    for i, q in zip(active, qs):
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
    |τ| has the bits that ties() computes for the same entries; numpy for the comparisons (docs/notes/merging.md)."""
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
            inside[j].append(a.take(np.flatnonzero(w)))  # a copy (the buffer is reused); faster than a[w]
    return above, [np.concatenate(parts) for parts in inside]
