"""`make bench`: posttrain side by side with the libraries underneath, one file per figure.

    python -m benchmarks.run [--quick] [--only train,merge,eval,rerun,rollout,real] [--runs N] [--update-readme]

  train.py    sft and dpo stages vs a plain TRL script: s/step (goal <= 1.03), whole stage (goal <= 1.10)
  merge.py    task arithmetic, TIES, DARE, model_stock, DELLA on 3 x 1.1 GB models: vs raw read+write
              (<= 1.5 / <= 3 / <= 5 DELLA),
              vs mergekit's CLI, peak RSS (<= 3 x largest tensor + 200 MB)
  eval.py     world suite: `posttrain eval` vs the `lm_eval` CLI (goal <= 1.05)
  rerun.py    config error (< 10 s), rerun of a finished pipeline (< 5 s)
  rollout.py  GPU only: vLLM vs transformers generate, tokens/s
  real.py     train and merge figures again on a model of Qwen2.5-0.5B's shape (random, bf16, built once into
              the posttrain cache): s/step, whole stage and peak RSS vs plain TRL; merge vs raw and mergekit

Every ratio is posttrain over the raw side, median of >= 3 back-to-back pairs (--runs). Results go to
benchmarks/results.json; the table goes to stdout and, with --update-readme, into README.md between the
`<!-- bench:begin -->` / `<!-- bench:end -->` markers. A run of some groups (--only) keeps the other groups'
figures from the previous results.json, each row with the date of the run that measured it, and the README
header says which run measured which groups. --quick shrinks every size for development (its numbers
mean nothing). About 14 minutes on 2 quiet CPU cores: 4.6 measured without `real` (2026-11-28), and `real`
about 9 (8.8 min of CPU time, 21.9 min wall under a load of 5-6, 2026-12-05). Every side runs
single-threaded (BENCH_THREADS=1, see common.bench_env). model_stock and DELLA (added 2026-12-05) add about 3
minutes (estimated from one run of their sides, docs/notes/merging.md).
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
MERGE_METHODS = ["task_arithmetic", "ties", "dare_linear", "model_stock", "della"]
# mergekit's TIES takes ~2 minutes a run on 2 cores (mergekit 0.1.5) and its DELLA ~3 (estimated from one run's
# ratio; it argsorts every row twice): --mergekit task_arithmetic,ties,della adds them.
MERGEKIT_METHODS = ["task_arithmetic", "dare_linear", "model_stock"]


def collect(groups: list[str], runs: int, quick: bool, mergekit: list[str]) -> list[Figure]:
    figures: list[Figure] = []
    for group in [g for g in GROUPS if g in groups]:
        for f in _group(group, runs, quick, mergekit):
            f.group = group
            figures.append(f.finish())
    return figures


def _group(group: str, runs: int, quick: bool, mergekit: list[str]) -> list[Figure]:
    if group == "train":
        from benchmarks import train

        return train.figures("sft", 5 if quick else 40, runs) + train.figures("dpo", 5 if quick else 20, runs)
    if group == "merge":
        from benchmarks import merge
        from benchmarks.merge_data import QUICK, Shape

        return merge.figures(QUICK if quick else Shape(), MERGE_METHODS, mergekit, runs)
    if group == "eval":
        from benchmarks import eval as eval_figure

        return [eval_figure.figure(5 if quick else 50, runs)]
    if group == "rerun":
        from benchmarks import rerun

        return rerun.figures(runs)
    if group == "rollout":
        from benchmarks import rollout

        return [rollout.figure(runs)]
    from benchmarks import real

    return real.figures(runs, quick)


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


def merged(previous: dict | None, results: dict) -> dict:
    """`results` plus the previous run's figures of the groups it did not run (a run with --only).

    A kept figure carries the date of the run that measured it (`measured`); `measurements` lists those runs.
    Figures of a group that ran again are replaced, the rest keep their order; new ones come last."""
    if not previous or previous.get("quick") or results["quick"]:
        return results
    ran = set(results["groups"])
    fresh = {f["name"]: f for f in results["figures"]}
    figures = []
    for f in previous["figures"]:
        if f["name"] in fresh:
            figures.append(fresh.pop(f["name"]))
        elif f.get("group") not in ran:
            figures.append({**f, "measured": f.get("measured", previous["date"])})
    figures += fresh.values()
    dates = {f["measured"] for f in figures}
    earlier = [m for m in previous.get("measurements", [_measurement(previous)]) if m["date"] in dates]
    return {**results, "figures": figures, "measurements": [m for m in earlier if m["date"] != results["date"]]
            + results["measurements"]}


def _measurement(results: dict) -> dict:
    """What the README header says of one run (results.json files before --only merging have one, at the top)."""
    groups = results.get("groups") or [g for g in GROUPS if g != "real"]  # older files: a full run before 'real'
    full = set(groups) >= set(GROUPS) or "groups" not in results
    command = "make bench" if full else f'make bench ARGS="--only {",".join(groups)}"'
    return {"date": results["date"], "command": command, "groups": groups, "runs": results["runs"],
            "minutes": results["minutes"], "machine": results["machine"]}


def header(measurements: list[dict]) -> str:
    """The README lines above the table: one per run whose figures it shows, the latest first."""
    lines = []
    for m in measurements:
        host = m["machine"]
        cpu = f"{host['cpu']}, {host['cores']} cores, {host['memory_gb']} GB" + (f", {host['gpu']}" if host["gpu"] else "")
        load = ", ".join(map(str, host["load_average_at_start"]))
        rows = f": the {', '.join(m['groups'])} rows" if len(measurements) > 1 else ""
        lines.append(f"{'Latest ' if not lines else ''}`{m['command']}` ({m['date'][:10]}, {cpu}; load average at "
                     f"start {load}; {m['minutes']} min, median of {m['runs']}){rows}")
    return ";\n".join(lines) + ":\n"


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
    date = dt.datetime.now().isoformat(timespec="seconds")
    results = {"date": date, "machine": host, "runs": args.runs, "quick": args.quick, "minutes": round(minutes, 1),
               "groups": groups, "figures": [{**f.to_json(), "measured": date} for f in figures]}
    results["measurements"] = [_measurement(results)]
    results = merged(json.loads(OUT.read_text()) if OUT.is_file() else None, results)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(table(figures))
    off = [f.name for f in figures if f.status == "OFF GOAL"]
    print(f"\n{len(figures)} figures in {minutes:.1f} min; off goal: {', '.join(off) or 'none'}; -> {OUT}")
    if args.update_readme and not args.quick:
        rows = [Figure(**{k: v for k, v in f.items() if k not in ("met", "measured")}) for f in results["figures"]]
        if not update_readme(header(results["measurements"]) + "\n" + table(rows)):
            print("README.md has no bench markers; table not written there", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
