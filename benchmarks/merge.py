"""Merge figures: posttrain's merge stage on three synthetic ~1.1 GB models (benchmarks/merge_data.py: a base and
two fine-tunes, sharded safetensors in a temporary folder).

  * time vs raw: the stage's run() (merge_worker.py, timed after imports) over a script that only reads every
    input tensor once and writes the output (goal <= 1.5 task arithmetic, <= 3 TIES, DARE and model_stock,
    <= 5 DELLA);
  * time vs mergekit: the same worker process, wall clock (interpreter start and imports included), over
    `mergekit-yaml` on the same inputs, dtype and shard size. The worker is the merge itself without the
    pipeline's bookkeeping (config file, DONE hashes), which a `posttrain stage merge` adds;
  * peak RSS of the stage's process (VmHWM) against 3 x the largest tensor + 200 MB. The stage reads with
    pread into reused slice buffers, so no input page is mapped; the raw script reads through safetensors'
    memory maps, whose pages count in its RSS (`raw_peak_rss_mb`); the sampled anonymous peak is in `detail`,
    and so is mergekit's peak (its ru_maxrss, taken by common.measured's launcher).
`compare` runs the same figures on any three folders (benchmarks/real.py: bf16 models of a real shape).
Each round runs every side once, the order reversed every other round; every output is deleted and the page
cache flushed to disk (sync) between runs, outside the clocks.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from benchmarks import mergekit_cli
from benchmarks.common import Figure, bench_env, measured, median, python, ratio_figure, unavailable
from benchmarks.merge_data import Shape, write_models

# model_stock reads a tensor over CACHE_BYTES twice (its angle, then the merge), as TIES does; DELLA sorts every
# row's magnitudes (a sort per row of 1,024-2,816 entries, per model), which the others never do.
RAW_GOALS = {"task_arithmetic": 1.5, "ties": 3.0, "dare_linear": 3.0, "dare_ties": 3.0, "model_stock": 3.0,
             "della": 5.0}
MB = 2**20


def _rounds(sides: dict[str, Callable[[], None]], runs: int) -> None:
    names = list(sides)
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            sides[name]()


def figures(shape: Shape, methods: list[str], mergekit_methods: list[str], runs: int) -> list[Figure]:
    """The merge group on three synthetic Llama-shaped float32 models (merge_data.py)."""
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as d:
        inputs = write_models(Path(d) / "in", shape)
        size = f"3 models x {shape.nbytes() / 1e9:.2f} GB, {shape.shard_bytes // MB} MB shards, float32"
        return compare(inputs, shape.shard_bytes, methods, mergekit_methods, runs, "merge", size)


def compare(inputs: list[Path], shard_bytes: int, methods: list[str], mergekit_methods: list[str], runs: int,
            label: str, size: str, dtype: str = "float32") -> list[Figure]:
    """Time and peak RSS of merging inputs[1:] onto inputs[0] (HF folders, any dtype, written as `dtype`)."""
    env = bench_env()
    with tempfile.TemporaryDirectory(prefix="bench-merge-out-") as d:
        tmp = Path(d)
        os.sync()  # the inputs' write-back must not land in the first run's clock
        why_not = mergekit_cli.install() if mergekit_methods else None
        worker: dict[str, list[dict]] = {m: [] for m in ["raw", *methods]}
        mk: dict[str, list[tuple[float, float]]] = {m: [] for m in mergekit_methods if not why_not}

        def side(kind: str, method: str) -> Callable[[], None]:
            def go() -> None:
                out = tmp / "out"
                if kind == "worker":
                    cmd = [python(), "-m", "benchmarks.merge_worker", method, str(out), str(shard_bytes),
                           *map(str, inputs)]
                    wall, stdout, _ = measured(cmd, env)
                    worker[method].append({**json.loads(stdout.strip().splitlines()[-1]), "wall": wall})
                else:
                    cmd = mergekit_cli.command(method, inputs, out, shard_bytes, tmp, dtype)
                    wall, _, rss = measured(cmd, mergekit_cli.env())
                    mk[method].append((wall, rss))
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
            return go

        sides = {f"w:{m}": side("worker", m) for m in worker}
        sides.update({f"mk:{m}": side("mergekit", m) for m in mk})
        _rounds(sides, runs)
    return _figures(label, size, _largest_bytes(inputs[0]), methods, mergekit_methods, worker, mk, why_not)


def _largest_bytes(folder: Path) -> int:
    from posttrain.tensors import ShardedReader

    with ShardedReader(folder) as r:
        return max(math.prod(shape) * dtype.itemsize for _, shape, dtype in r.layout())


def _figures(label: str, size: str, largest: int, methods, mergekit_methods, worker, mk, why_not) -> list[Figure]:
    raw = [r["seconds"] for r in worker["raw"]]
    rss_goal = 3 * largest / MB + 200
    out: list[Figure] = []
    for m in methods:
        ours = [r["seconds"] for r in worker[m]]
        out.append(ratio_figure(f"{label} {m}: time vs raw read+write", ours, raw, RAW_GOALS[m], size))
    for m in mergekit_methods:
        name = f"{label} {m}: time vs mergekit CLI"
        if why_not:
            out.append(unavailable(name, why_not))
            continue
        ours = [r["wall"] for r in worker[m]]
        theirs = [w for w, _ in mk[m]]
        out.append(ratio_figure(name, ours, theirs, None, f"mergekit {mergekit_cli.VERSION}; {size}",
                                {"mergekit_peak_rss_mb": round(median([r for _, r in mk[m]]))}))
    for m in methods:
        rss = [r["peak_rss_mb"] for r in worker[m]]
        detail = {"peak_anon_mb": round(median([r["peak_anon_mb"] for r in worker[m]])),
                  "rss_after_imports_mb": round(median([r["rss_after_imports_mb"] for r in worker[m]])),
                  "raw_peak_rss_mb": round(median([r["peak_rss_mb"] for r in worker["raw"]])),
                  "largest_tensor_mb": round(largest / MB)}
        out.append(Figure(f"{label} {m}: peak RSS (MB)", median(rss), round(rss_goal), "MB", rss,
                          "goal: 3 x largest tensor + 200 MB", detail=detail))
    return out
