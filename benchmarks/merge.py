"""Merge figures: posttrain's merge stage on three synthetic ~1.1 GB models (benchmarks/merge_data.py: a base and
two fine-tunes, sharded safetensors in a temporary folder).

  * time vs raw: the stage's run() (merge_worker.py, timed after imports) over a script that only reads every
    input tensor once and writes the output (goal <= 1.5 task arithmetic, <= 3 TIES and DARE);
  * time vs mergekit: the same worker process, wall clock (interpreter start and imports included), over
    `mergekit-yaml` on the same inputs, dtype and shard size. The worker is the merge itself without the
    pipeline's bookkeeping (config file, DONE hashes), which a `posttrain stage merge` adds;
  * peak RSS of the stage's process (VmHWM) against 3 x the largest tensor + 200 MB. The stage reads with
    pread into reused slice buffers, so no input page is mapped; the raw script reads through safetensors'
    memory maps, whose pages count in its RSS (`raw_peak_rss_mb`); the sampled anonymous peak is in `detail`.
Each round runs every side once, the order reversed every other round; every output is deleted and the page
cache flushed to disk (sync) between runs, outside the clocks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from benchmarks import mergekit_cli
from benchmarks.common import Figure, bench_env, median, python, ratio_figure, unavailable
from benchmarks.merge_data import Shape, write_models

RAW_GOALS = {"task_arithmetic": 1.5, "ties": 3.0, "dare_linear": 3.0, "dare_ties": 3.0}
MB = 2**20


def _wait4(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS of the child in MB, stdout): os.wait4 returns that child's own rusage
    (ru_maxrss in KB on Linux), unlike RUSAGE_CHILDREN, a maximum over every child so far."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:5])} ... exited {proc.returncode}: {err.read()[-1500:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def _rounds(sides: dict[str, Callable[[], None]], runs: int) -> None:
    names = list(sides)
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            sides[name]()


def figures(shape: Shape, methods: list[str], mergekit_methods: list[str], runs: int) -> list[Figure]:
    env = bench_env()
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as d:
        tmp = Path(d)
        inputs = write_models(tmp / "in", shape)
        os.sync()  # the inputs' write-back must not land in the first run's clock
        why_not = mergekit_cli.install() if mergekit_methods else None
        worker: dict[str, list[dict]] = {m: [] for m in ["raw", *methods]}
        mk: dict[str, list[tuple[float, float]]] = {m: [] for m in mergekit_methods if not why_not}

        def side(kind: str, method: str) -> Callable[[], None]:
            def go() -> None:
                out = tmp / "out"
                if kind == "worker":
                    cmd = [python(), "-m", "benchmarks.merge_worker", method, str(out), str(shape.shard_bytes),
                           *map(str, inputs)]
                    wall, _, stdout = _wait4(cmd, env)
                    worker[method].append({**json.loads(stdout.strip().splitlines()[-1]), "wall": wall})
                else:
                    cmd = mergekit_cli.command(method, inputs, out, shape.shard_bytes, tmp)
                    wall, rss, _ = _wait4(cmd, mergekit_cli.env())
                    mk[method].append((wall, rss))
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
            return go

        sides = {f"w:{m}": side("worker", m) for m in worker}
        sides.update({f"mk:{m}": side("mergekit", m) for m in mk})
        _rounds(sides, runs)
    return _figures(shape, methods, mergekit_methods, worker, mk, why_not)


def _figures(shape: Shape, methods, mergekit_methods, worker, mk, why_not) -> list[Figure]:
    size = f"3 models x {shape.nbytes() / 1e9:.2f} GB, {shape.shard_bytes // MB} MB shards, float32"
    raw = [r["seconds"] for r in worker["raw"]]
    rss_goal = 3 * shape.largest_bytes() / MB + 200
    out: list[Figure] = []
    for m in methods:
        ours = [r["seconds"] for r in worker[m]]
        out.append(ratio_figure(f"merge {m}: time vs raw read+write", ours, raw, RAW_GOALS[m], size))
    for m in mergekit_methods:
        name = f"merge {m}: time vs mergekit CLI"
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
                  "largest_tensor_mb": round(shape.largest_bytes() / MB)}
        out.append(Figure(f"merge {m}: peak RSS (MB)", median(rss), round(rss_goal), "MB", rss,
                          "goal: 3 x largest tensor + 200 MB", detail=detail))
    return out
