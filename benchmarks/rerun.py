"""CLI contracts measured in seconds: a config error exits 2 with one line (goal < 10 s), and the rerun of a finished
pipeline skips the stage and reuses its eval (goal < 5 s). Whole commands, medians of `runs`."""
from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import Figure, bench_env, median, python

TINY = ["--set", "trainer.max_steps=5", "--set", "eval.limit=10"]


def _cli(*args: str, expect: int) -> float:
    import subprocess
    import time

    start = time.perf_counter()
    r = subprocess.run([python(), "-m", "posttrain", *args], capture_output=True, text=True, env=bench_env())
    if r.returncode != expect:
        raise RuntimeError(f"posttrain {' '.join(args[:3])} exited {r.returncode}, expected {expect}: {r.stderr[-800:]}")
    return time.perf_counter() - start


def figures(runs: int) -> list[Figure]:
    errors = [_cli("stage", "sft", "--set", "trainer.learning_rat=1e-5", expect=2) for _ in range(runs)]
    out = [Figure("config error, exit 2 (s)", median(errors), 10.0, "s", errors)]
    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as d:
        run_dir = str(Path(d) / "run")
        _cli("stage", "sft", "--run-dir", run_dir, *TINY, expect=0)
        reruns = [_cli("stage", "sft", "--run-dir", run_dir, *TINY, expect=0) for _ in range(runs)]
    out.append(Figure("rerun of a finished pipeline (s)", median(reruns), 5.0, "s", reruns,
                      "sft stage, eval on: both skipped/reused"))
    return out
