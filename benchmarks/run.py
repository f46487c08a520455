"""`make bench`: timings that are contracts of the CLI, measured as medians of repeated runs.

Today: the one-line config error (goal < 10 s) and the rerun of a finished pipeline (goal < 5 s). The ratios
against raw TRL / safetensors / lm-eval (issue "Benchmarks and scale") are not written yet.
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results.json"
TINY = ["--set", "trainer.max_steps=5", "--set", "eval.limit=10"]


def _cli(*args: str) -> tuple[float, int]:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True)
    return time.perf_counter() - start, r.returncode


def _median(fn, runs: int = 3) -> float:
    return statistics.median(fn() for _ in range(runs))


def main() -> int:
    rows = []

    def config_error() -> float:
        seconds, rc = _cli("stage", "sft", "--set", "trainer.learning_rat=1e-5")
        assert rc == 2, rc
        return seconds

    rows.append(("config error exit 2 (s)", _median(config_error), 10.0))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = str(Path(tmp) / "run")
        _, rc = _cli("stage", "sft", "--run-dir", run_dir, *TINY)
        assert rc == 0, "the pipeline to rerun failed"

        def rerun() -> float:
            seconds, code = _cli("stage", "sft", "--run-dir", run_dir, *TINY)
            assert code == 0
            return seconds

        rows.append(("rerun of a finished pipeline (s)", _median(rerun), 5.0))
    results = {"machine": f"{platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()}",
               "figures": [{"name": n, "value": round(v, 2), "goal": g, "met": v <= g} for n, v, g in rows]}
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'figure':40s} {'value':>8s} {'goal':>8s}  status")
    for f in results["figures"]:
        print(f"{f['name']:40s} {f['value']:8.2f} {f['goal']:8.2f}  {'ok' if f['met'] else 'OFF GOAL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
