"""The seed claims (issue 11) reproduced on the embedded world: run their pipelines, then write claims.md.

    python -m experiments.claims [--runs runs/claims] [--only NAME,...] [--no-run] [--update-readme]

Each claim names a pipeline in ``configs/pipelines/claims/`` (run into ``<runs>/<pipeline>``; a rerun skips
the finished stages) and the comparisons that decide it, all fixed here before any outcome was seen. Every
number in ``<runs>/claims.md`` is read from the pipeline's ``report/forgetting.json`` (``stages[].scores``),
with its stderr; nothing is trained, tuned or recomputed here.

Decision rule, per comparison "row a beats row b on key" (higher is better): with d = a − b and
se = sqrt(se_a² + se_b²), the comparison is *held* when d > 2·se, *not held* when d < −2·se, and *not
significant* otherwise (a missing stderr counts as 0). A claim's *premises* (e.g. "the specialist learned its
task") must all be held, or the verdict is *cannot show*: the world did not set up what the claim is about.
Otherwise the claim is *held* when every comparison is held, *not held* when any is not held, and *not
significant* in every other case. An exact-match comparison whose two rows both score 0 within 2 of their own
stderr is marked *at floor* (nothing is left on either side to compare); a claim whose comparisons are all at
floor reads *cannot show*. (This floor rule was added after the first run, where every merge lost both skills;
it never makes a claim hold.) *Context* rows are shown beside the verdict and never decide it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.rundir import replace_marked

REPO = Path(__file__).resolve().parent.parent
CLAIMS_DIR = REPO / "configs" / "pipelines" / "claims"
HELD, NOT_HELD, NOT_SIGNIFICANT, CANNOT_SHOW, NO_REPORT = (
    "held", "not held", "not significant", "cannot show", "no report")
ARITH, REV, FACTS, VERIF = ("world_arithmetic/exact_match", "world_reversal/exact_match", "world_facts/acc",
                            "world_verifiable/exact_match")


@dataclass(frozen=True)
class Comparison:
    """Row `a` scores higher than row `b` on `key`; rows are report row names (stage, `base`, `input:<ref>`)."""

    label: str
    key: str
    a: str
    b: str


@dataclass(frozen=True)
class Claim:
    id: str
    pipeline: str  # a file stem in configs/pipelines/claims/ and the run folder's name
    statement: str
    comparisons: tuple[Comparison, ...]
    premises: tuple[Comparison, ...] = ()
    context: tuple[Comparison, ...] = ()
    limits: str = ""  # what the tiny world cannot show, written before any run


def _c(label: str, key: str, a: str, b: str) -> Comparison:
    return Comparison(label, key, a, b)


_LINEAR_VS = tuple(
    _c(f"{m} keeps more of {who} than linear", key, m, "linear")
    for m in ("ties", "dare_linear") for who, key in (("arithmetic", ARITH), ("reversal", REV)))
_SPECIALISTS_LEARNED = (
    _c("arithmetic specialist learned arithmetic", ARITH, "input:world-sft-arithmetic", "base"),
    _c("reversal specialist learned reversal", REV, "input:world-sft-reversal", "base"),
)

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "1", "hft_vs_full",
        "Half Fine-Tuning forgets less than full fine-tuning in sequential training (arithmetic, then reversal).",
        comparisons=(
            _c("HFT keeps more arithmetic after reversal", ARITH, "hft_reversal", "full_reversal"),
            _c("HFT keeps more facts after reversal", FACTS, "hft_reversal", "full_reversal"),
        ),
        premises=(
            _c("full SFT learned arithmetic", ARITH, "full_arithmetic", "base"),
            _c("HFT learned arithmetic", ARITH, "hft_arithmetic", "base"),
        ),
        context=(
            _c("arithmetic before reversal (HFT - full)", ARITH, "hft_arithmetic", "full_arithmetic"),
            _c("reversal learned (HFT - full)", REV, "hft_reversal", "full_reversal"),
        ),
        limits="The HFT paper measures forgetting of a 7B model's broad pretrained abilities over long task "
               "sequences; here it is two 800-step tasks on a 1M-parameter model, one seed, and HFT's half is "
               "drawn at random per stage, so one run cannot separate the method from the draw.",
    ),
    Claim(
        "2", "grpo_vs_sft",
        "GRPO forgets less of earlier tasks than SFT on the same task (verifiable, from world-sft).",
        comparisons=(
            _c("GRPO keeps more arithmetic", ARITH, "grpo_verifiable", "sft_verifiable"),
            _c("GRPO keeps more facts", FACTS, "grpo_verifiable", "sft_verifiable"),
        ),
        premises=(
            _c("GRPO gained on verifiable", VERIF, "grpo_verifiable", "base"),
            _c("SFT gained on verifiable", VERIF, "sft_verifiable", "base"),
        ),
        context=(_c("verifiable gained (GRPO - SFT)", VERIF, "grpo_verifiable", "sft_verifiable"),),
        limits="The stage defaults spend different compute (GRPO: 60 steps of 8 prompts x 8 samples; SFT: 800 "
               "steps of 32 rows) and need not reach the same verifiable score, while the papers compare "
               "forgetting at matched new-task accuracy. Verifiable shares its numbers with arithmetic, so the "
               "arithmetic row also measures transfer between two phrasings of one skill.",
    ),
    Claim(
        "3a", "recycle_then_finetune",
        "Fine-tuning transfer lifts world-v2 without training (world-v2 + (world-sft - world)).",
        comparisons=(_c("transfer lifts arithmetic", ARITH, "transfer", "base"),),
        premises=(_c("world-sft learned arithmetic over world-v2", ARITH, "input:world-sft", "base"),),
        context=(_c("facts after transfer (world-sft trained facts too)", FACTS, "transfer", "base"),),
        limits="world-v2 is the world base continued for 100 steps on a re-drawn corpus, far closer to its "
               "predecessor than a new LLM release; the lift is read on arithmetic, the skill world-sft gained "
               "(its facts score is below the base's), one λ = 1 and no search.",
    ),
    Claim(
        "3b", "recycle_then_finetune",
        "Recycling-then-finetuning beats finetuning from bare world-v2 at equal steps (60 SFT steps each).",
        comparisons=(_c("recycled start ends higher on arithmetic", ARITH, "sft_recycled", "sft_from_v2"),),
        context=(_c("facts (recycled - bare)", FACTS, "sft_recycled", "sft_from_v2"),),
        limits="One step budget (60, from recycle_then_finetune.yaml) and one seed; the paper's gain shrinks "
               "as fine-tuning runs longer, which one budget cannot show.",
    ),
    Claim(
        "4a", "merge_methods",
        "TIES and DARE keep more of each specialist than plain averaging (linear).",
        comparisons=_LINEAR_VS,
        premises=_SPECIALISTS_LEARNED,
        limits="Two specialists of a 1M-parameter model with method defaults made for LLMs (TIES density 0.2, "
               "DARE density 0.1, lam 1), one DARE seed; the papers' interference arguments assume many "
               "specialists and small task vectors, which 800 high-rate SFT steps on a tiny model are not.",
    ),
    Claim(
        "4b", "merge_methods",
        "Breadcrumbs keeps more of each specialist than task arithmetic.",
        comparisons=(
            _c("breadcrumbs keeps more arithmetic", ARITH, "breadcrumbs", "task_arithmetic"),
            _c("breadcrumbs keeps more reversal", REV, "breadcrumbs", "task_arithmetic"),
        ),
        premises=_SPECIALISTS_LEARNED,
        limits="Breadcrumbs' defaults (beta 0.01, gamma 0.9) keep 9% of each task vector's entries; the paper "
               "tunes them per model family and reports its gains with many tasks, not two.",
    ),
)


# ------------------------------------------------------------------------------------------- deciding


def compare(a: dict, b: dict, z: float = 2.0) -> dict:
    """{"a", "a_se", "b", "b_se", "diff", "se", "verdict"} for score dicts {"value", "stderr"} (a beats b?)."""
    a_se, b_se = a.get("stderr") or 0.0, b.get("stderr") or 0.0
    diff, se = a["value"] - b["value"], math.sqrt(a_se ** 2 + b_se ** 2)
    # 1e-9: scores are counts over n examples, so a difference of exactly 2 se must not flip on float rounding.
    verdict = NOT_SIGNIFICANT if abs(diff) <= z * se + 1e-9 else (HELD if diff > 0 else NOT_HELD)
    return {"a": a["value"], "a_se": a_se, "b": b["value"], "b_se": b_se, "diff": diff, "se": se,
            "verdict": verdict}


def rows_of(report: dict) -> dict[str, dict]:
    """Report row name -> its scores, from a forgetting.json."""
    return {s["name"]: s["scores"] for s in report["stages"]}


def _outcome(comp: Comparison, rows: dict[str, dict]) -> dict:
    for row in (comp.a, comp.b):
        if comp.key not in rows.get(row, {}):
            return {"verdict": NO_REPORT, "missing": f"{row} {comp.key}"}
    out = compare(rows[comp.a][comp.key], rows[comp.b][comp.key])
    out["floor"] = comp.key.endswith("/exact_match") and all(
        out[v] <= 2 * out[f"{v}_se"] + 1e-9 for v in ("a", "b"))  # exact match cannot go below 0
    return out


def decide(claim: Claim, report: dict | None) -> dict:
    """The claim's verdict and every comparison's outcome, from its pipeline's forgetting.json (None: no run)."""
    if report is None:
        return {"verdict": NO_REPORT, "premises": [], "comparisons": [], "context": []}
    rows = rows_of(report)
    out = {part: [(c, _outcome(c, rows)) for c in getattr(claim, part)]
           for part in ("premises", "comparisons", "context")}
    verdicts = [o["verdict"] for _, o in out["comparisons"]]
    if NO_REPORT in verdicts or any(o["verdict"] == NO_REPORT for _, o in out["premises"]):
        verdict = NO_REPORT
    elif any(o["verdict"] != HELD for _, o in out["premises"]) or all(o["floor"] for _, o in out["comparisons"]):
        verdict = CANNOT_SHOW
    elif all(v == HELD for v in verdicts):
        verdict = HELD
    elif NOT_HELD in verdicts:
        verdict = NOT_HELD
    else:
        verdict = NOT_SIGNIFICANT
    return {"verdict": verdict, **out}


# ------------------------------------------------------------------------------------------- writing


def _score(value: float, se: float) -> str:
    # World scores are counts over 100 (or 50) examples, so two decimals are the value exactly; stderr gets three.
    return f"{value:.2f} ± {se:.3f}"


def _comparison_row(kind: str, comp: Comparison, o: dict) -> str:
    if o["verdict"] == NO_REPORT:
        return f"| {kind} | {comp.label} | {comp.key} | - | - | - | - | no score ({o['missing']}) |"
    return (f"| {kind} | {comp.label} | {comp.key} | {comp.a}: {_score(o['a'], o['a_se'])} | "
            f"{comp.b}: {_score(o['b'], o['b_se'])} | {o['diff']:+.2f} | {2 * o['se']:.3f} | {_outcome_text(o)} |")


def _outcome_text(o: dict) -> str:
    return o["verdict"] + ("; both at floor" if o.get("floor") else "")


def showed(decision: dict) -> str:
    """One line: what the world showed, numbers as in the report (a vs b, difference, verdict)."""
    if decision["verdict"] == NO_REPORT:
        return "no report: the pipeline did not finish"
    parts = decision["premises"] if decision["verdict"] == CANNOT_SHOW else decision["comparisons"]
    if decision["verdict"] == CANNOT_SHOW and any(o["verdict"] != HELD for _, o in parts):
        parts = [(c, o) for c, o in parts if o["verdict"] != HELD]
    elif decision["verdict"] == CANNOT_SHOW:  # premises held: every comparison is at floor
        parts = decision["comparisons"]
    return "; ".join(f"{c.label}: {c.a} {_score(o['a'], o['a_se'])} vs {c.b} {_score(o['b'], o['b_se'])} "
                     f"({_outcome_text(o)})" for c, o in parts)


def summary_table(claims: tuple[Claim, ...], decisions: dict[str, dict], link_prefix: str = "") -> str:
    lines = ["| claim | verdict | what the world showed (score ± stderr) | report |", "|---|---|---|---|"]
    for claim in claims:
        d = decisions[claim.id]
        link = f"[{claim.pipeline}]({link_prefix}{claim.pipeline}/report/forgetting.md)"
        lines.append(f"| {claim.id}. {claim.statement} | **{d['verdict']}** | {showed(d)} | {link} |")
    return "\n".join(lines)


def claim_section(claim: Claim, d: dict) -> str:
    head = (f"## {claim.id}. {claim.statement}\n\nPipeline `configs/pipelines/claims/{claim.pipeline}.yaml`, "
            f"report [{claim.pipeline}/report/forgetting.json]({claim.pipeline}/report/forgetting.json). "
            f"**Verdict: {d['verdict']}.**\n")
    if d["verdict"] == NO_REPORT and not d["comparisons"]:
        return head + "\nNo report: the pipeline has not finished.\n"
    table = ["| role | comparison | score | a | b | a − b | 2·se | outcome |", "|---|---|---|---|---|---|---|---|"]
    for kind, part in (("premise", "premises"), ("claim", "comparisons"), ("context", "context")):
        table += [_comparison_row(kind, c, o) for c, o in d[part]]
    return "\n".join([head, f"What the world showed: {showed(d)}.", "", *table, "",
                      f"What the tiny world cannot show: {claim.limits}", ""])


def render(claims: tuple[Claim, ...], decisions: dict[str, dict], header: str = "") -> str:
    intro = ("# Seed claims on the embedded world\n\n"
             f"{header}Written by `make claims` (`python -m experiments.claims`); every score is copied from the "
             "cited `report/forgetting.json` (value ± stderr). A comparison a > b is *held* when a − b > 2·se, "
             "*not held* when b − a > 2·se, *not significant* otherwise (se = sqrt(se_a² + se_b²)); an exact-match "
             "comparison is *at floor* when both rows are 0 within 2 of their own stderr. A claim is held when "
             "all its comparisons are, not held when any is not held, not significant otherwise; it reads "
             "*cannot show* when one of its premises is not held or all its comparisons are at floor. Context "
             "rows never decide a verdict.\n")
    sections = [claim_section(c, decisions[c.id]) for c in claims]
    return "\n".join([intro, "## Summary\n", summary_table(claims, decisions), "", *sections])


# ------------------------------------------------------------------------------------------- running


def load_report(run: Path) -> dict | None:
    path = run / "report" / "forgetting.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_pipeline(name: str, runs: Path) -> tuple[int, float]:
    """`posttrain run` the claim's pipeline in a fresh process, one torch thread (the machine is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "posttrain", "run", str(CLAIMS_DIR / f"{name}.yaml"), "--run-dir", str(runs / name)]
    start = time.monotonic()
    rc = subprocess.run(cmd, env=env, cwd=REPO).returncode
    return rc, time.monotonic() - start


def update_readme(table: str, readme: Path = REPO / "README.md") -> bool:
    """Replace what lies between the claims markers; False (README untouched) when they are absent."""
    return replace_marked(readme, "claims", table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.claims", description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/claims", help="one run folder per pipeline, and claims.md")
    p.add_argument("--only", default="", help="comma-separated pipeline names to run (all: empty)")
    p.add_argument("--no-run", action="store_true", help="only write claims.md from the reports there")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    names = list(dict.fromkeys(c.pipeline for c in CLAIMS))
    chosen = [n for n in names if not args.only or n in args.only.split(",")]
    failed, took = [], {}
    start = time.monotonic()
    for name in [] if args.no_run else chosen:
        rc, took[name] = run_pipeline(name, runs)
        print(f"claims: {name} finished with exit {rc} in {took[name] / 60:.1f} min", file=sys.stderr, flush=True)
        if rc:
            failed.append(name)
    decisions = {c.id: decide(c, load_report(runs / c.pipeline)) for c in CLAIMS}
    header = ""
    if took:
        header = (f"Run {time.strftime('%Y-%m-%d')}: " + ", ".join(f"{n} {s / 60:.1f} min" for n, s in took.items())
                  + f"; total {(time.monotonic() - start) / 60:.1f} min (stages already done are skipped).\n\n")
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "claims.md").write_text(render(CLAIMS, decisions, header))
    print(f"claims: wrote {runs / 'claims.md'}", file=sys.stderr)
    if args.update_readme and not update_readme(header + summary_table(CLAIMS, decisions, f"{runs}/")):
        print("README.md has no claims markers; table not written there", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
