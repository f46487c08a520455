"""`make bench`: posttrain side by side with the libraries underneath, one file per figure.

    python -m benchmarks.run [--quick] [--only train,merge,eval,rerun,rollout,real] [--runs N] [--update-readme]

  train.py    sft and dpo stages vs a plain TRL script: s/step (goal <= 1.03), whole stage (goal <= 1.10)
  merge.py    task arithmetic, TIES, DARE on 3 x 1.1 GB models: vs raw read+write (<= 1.5 / <= 3),
              vs mergekit's CLI, peak RSS (<= 3 x largest tensor + 200 MB)
  eval.py     world suite: `posttrain eval` vs the `lm_eval` CLI (goal <= 1.05)
  rerun.py    config error (< 10 s), rerun of a finished pipeline (< 5 s)
  rollout.py  GPU only: vLLM vs transformers generate, tokens/s
  real.py     train and merge figures again on a model of Qwen2.5-0.5B's shape (random, bf16, built once into
              the posttrain cache): s/step, whole stage and peak RSS vs plain TRL; merge vs raw and mergekit

Every ratio is posttrain over the raw side, median of >= 3 back-to-back pairs (--runs). Results go to
benchmarks/results.json; the table goes to stdout and, with --update-readme, into README.md between the
`<!-- bench:begin -->` / `<!-- bench:end -->` markers. --quick shrinks every size for development (its numbers
mean nothing). About 5 minutes on 2 CPU cores (4.6 measured, 2026-11-28). Every side runs single-threaded (BENCH_THREADS=1, see
common.bench_env).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, Figure, machine
from posttrain.rundir import replace_marked

OUT = Path(__file__).resolve().parent / "results.json"
GROUPS = ("train", "merge", "eval", "rerun", "rollout", "real")
# DARE is timed as dare_linear (random drop, then task arithmetic): dare_ties adds TIES's sign election, which
# TIES's own figure already times, and costs ~45 s a run more (3 runs of both sides would break the 20 minutes).
MERGE_METHODS = ["task_arithmetic", "ties", "dare_linear"]
# mergekit's TIES takes ~2 minutes a run on 2 cores (mergekit 0.1.5): --mergekit task_arithmetic,ties adds it.
MERGEKIT_METHODS = ["task_arithmetic", "dare_linear"]


def collect(groups: list[str], runs: int, quick: bool, mergekit: list[str]) -> list[Figure]:
    figures: list[Figure] = []
    if "train" in groups:
        from benchmarks import train

        figures += train.figures("sft", 5 if quick else 40, runs)
        figures += train.figures("dpo", 5 if quick else 20, runs)
    if "merge" in groups:
        from benchmarks import merge
        from benchmarks.merge_data import QUICK, Shape

        figures += merge.figures(QUICK if quick else Shape(), MERGE_METHODS, mergekit, runs)
    if "eval" in groups:
        from benchmarks import eval as eval_figure

        figures.append(eval_figure.figure(5 if quick else 50, runs))
    if "rerun" in groups:
        from benchmarks import rerun

        figures += rerun.figures(runs)
    if "rollout" in groups:
        from benchmarks import rollout

        figures.append(rollout.figure(runs))
    if "real" in groups:
        from benchmarks import real

        figures += real.figures(runs, quick)
    return [f.finish() for f in figures]


def _value(f: Figure) -> str:
    if f.value is None:
        return "-"
    return f"{f.value:.0f}" if f.unit == "MB" else f"{f.value:.2f}"


def table(figures: list[Figure]) -> str:
    rows = ["| figure | value | goal | status | runs | note |", "|---|---:|---:|---|---|---|"]
    for f in figures:
        goal = "-" if f.goal is None else (f"{f.goal:.0f}" if f.unit == "MB" else f"{f.goal:g}")
        runs = " ".join(f"{r:.0f}" if f.unit == "MB" else f"{r:.2f}" for r in f.runs)
        rows.append(f"| {f.name} | {_value(f)} | {goal} | {f.status} | {runs} | {f.note} |")
    return "\n".join(rows)


def update_readme(text: str, readme: Path = REPO / "README.md") -> bool:
    """Replace what lies between the bench markers; False (README untouched) when the markers are absent."""
    return replace_marked(readme, "bench", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for developing the bench")
    p.add_argument("--only", default=",".join(GROUPS), help="comma-separated: " + ",".join(GROUPS))
    p.add_argument("--runs", type=int, default=3, help="pairs per figure (the median is reported)")
    p.add_argument("--mergekit", default=",".join(MERGEKIT_METHODS), help="methods timed against mergekit")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)
    groups = [g for g in args.only.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        p.error(f"unknown group {unknown[0]!r}; known: {', '.join(GROUPS)}")
    start, host = time.time(), machine()
    figures = collect(groups, args.runs, args.quick, [m for m in args.mergekit.split(",") if m])
    minutes = (time.time() - start) / 60
    results = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": host, "runs": args.runs,
               "quick": args.quick, "minutes": round(minutes, 1), "figures": [f.to_json() for f in figures]}
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    text = table(figures)
    print(text)
    off = [f.name for f in figures if f.status == "OFF GOAL"]
    print(f"\n{len(figures)} figures in {minutes:.1f} min; off goal: {', '.join(off) or 'none'}; -> {OUT}")
    if args.update_readme and not args.quick:
        cpu = f"{host['cpu']}, {host['cores']} cores, {host['memory_gb']} GB" + (f", {host['gpu']}" if host["gpu"] else "")
        load = ", ".join(map(str, host["load_average_at_start"]))
        header = (f"Latest `make bench` ({results['date'][:10]}, {cpu}; load average at start {load}; "
                  f"{minutes:.1f} min, median of {args.runs}):\n")
        if not update_readme(header + "\n" + text):
            print("README.md has no bench markers; table not written there", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
