"""Claims: what a claim is, how its runs' per-example scores decide it, and how claims.md shows it.

The statistics are experiments/claims_stats.py's; the claims themselves and the runner are experiments/claims.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from experiments.claims_stats import HELD, NOT_HELD, Z, closest, paired, summary

CANNOT_SHOW, NO_REPORT = "cannot show", "no report"


@dataclass(frozen=True)
class Comparison:
    """Row `a` scores higher than row `b` on `key` (with `same`: the two match); rows are run-dir row names
    (a stage, `base`, `input:<folder>`) or a claim's matched row."""

    label: str
    key: str
    a: str
    b: str
    same: bool = False


@dataclass(frozen=True)
class Match:
    """Row `name` is, in each seed, the rung of `rungs` (stages differing only in steps, fewest first) whose `key`
    score is closest to row `target`'s in that seed (claims_stats.closest)."""

    name: str
    rungs: tuple[str, ...]
    key: str
    target: str


@dataclass(frozen=True)
class Claim:
    id: str
    pipeline: str  # a file stem in configs/pipelines/claims/ and the run folder's name
    statement: str
    comparisons: tuple[Comparison, ...]
    premises: tuple[Comparison, ...] = ()
    context: tuple[Comparison, ...] = ()
    matches: tuple[Match, ...] = ()
    design: str = ""  # how it is measured and why, written before any run
    limits: str = ""  # what the tiny world cannot show, written before any run


# ------------------------------------------------------------------------------------------- reading


def _items(path: Path) -> dict[str, dict[int, float]]:
    """{score key: {doc_id: value}} of one eval.json (written with eval.log_samples)."""
    record = json.loads(path.read_text())
    return {k: dict(zip(v["doc_id"], v["values"])) for k, v in (record.get("items") or {}).items()}


def read_rows(run: Path) -> dict[str, dict[str, dict[int, float]]]:
    """Row name -> per-example scores, from one seed's run dir: `base`, each finished stage (its DONE written),
    and `input:<folder>` for the reference models the run evaluated (inputs/<folder>/eval.json)."""
    rows = {}
    for path in sorted((run / "stages").glob("*/eval.json")):
        folder = path.parent.name
        if folder == "00_base":
            rows["base"] = _items(path)
        elif (path.parent / "DONE").is_file():
            rows[folder.split("_", 1)[1]] = _items(path)
    for path in sorted((run / "inputs").glob("*/eval.json")):
        rows[f"input:{path.parent.name}"] = _items(path)
    return rows


def _mean(scores: dict[int, float]) -> float:
    return sum(scores.values()) / len(scores)


def resolve_matches(claim: Claim, seeds: list[dict]) -> dict[str, list[str]]:
    """Add each Match's row to every seed's rows (in place); returns {match name: [chosen rung per seed]}."""
    chosen: dict[str, list[str]] = {}
    for m in claim.matches:
        for rows in seeds:
            have = [r for r in m.rungs if m.key in rows.get(r, {})]
            if m.key not in rows.get(m.target, {}) or not have:
                continue
            pick = have[closest(_mean(rows[m.target][m.key]), [_mean(rows[r][m.key]) for r in have])]
            rows[m.name] = rows[pick]
            chosen.setdefault(m.name, []).append(pick)
    return chosen


# ------------------------------------------------------------------------------------------- deciding


def _aligned(seeds: list[dict], row: str, key: str) -> tuple[list[int], list[list[float]]] | None:
    """(doc ids, values[seed][item]) of `row` on `key`, the same examples in every seed; None when missing."""
    per = [rows.get(row, {}).get(key) for rows in seeds]
    if any(p is None for p in per):
        return None
    ids = sorted(per[0])
    if any(sorted(p) != ids for p in per):
        raise ValueError(f"{row} {key}: the seeds scored different examples")
    return ids, [[p[i] for i in ids] for p in per]


def outcome(comp: Comparison, seeds: list[dict]) -> dict:
    """One comparison over the seeds: row summaries, the paired test, and whether both rows sit at floor."""
    a, b = _aligned(seeds, comp.a, comp.key), _aligned(seeds, comp.b, comp.key)
    if a is None or b is None:
        return {"verdict": NO_REPORT, "missing": f"{comp.a if a is None else comp.b} {comp.key}"}
    if a[0] != b[0]:
        raise ValueError(f"{comp.key}: {comp.a} and {comp.b} were scored on different examples")
    out = paired(a[1], b[1], same=comp.same)
    out["a"], out["b"] = summary(a[1]), summary(b[1])
    out["floor"] = not comp.same and comp.key.endswith("/exact_match") and all(
        out[v]["value"] <= Z * out[v]["se"] + 1e-9 for v in ("a", "b"))  # exact match cannot go below 0
    return out


def decide(claim: Claim, seeds: list[dict] | None) -> dict:
    """The claim's verdict and every comparison's outcome from the rows of each seed's run (None: no run)."""
    if not seeds:
        return {"verdict": NO_REPORT, "premises": [], "comparisons": [], "context": [], "chosen": {}}
    seeds = [dict(rows) for rows in seeds]
    chosen = resolve_matches(claim, seeds)
    out = {part: [(c, outcome(c, seeds)) for c in getattr(claim, part)]
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
        verdict = "not significant"
    return {"verdict": verdict, "chosen": chosen, "seeds": len(seeds), **out}


# ------------------------------------------------------------------------------------------- writing


def score(s: dict) -> str:
    """`mean ± half-width of the 95% interval (2·se)`, over seeds and examples."""
    return f"{s['value']:.3f} ± {Z * s['se']:.3f}"


def _outcome_text(o: dict) -> str:
    return o["verdict"] + ("; both at floor" if o.get("floor") else "")


def _per_seed(values: list[float]) -> str:
    return " / ".join(f"{v:+.2f}" for v in values)


def comparison_row(kind: str, comp: Comparison, o: dict) -> str:
    if o["verdict"] == NO_REPORT:
        return f"| {kind} | {comp.label} | {comp.key} | - | - | - | - | no score ({o['missing']}) |"
    test = "match" if comp.same else "a > b"
    return (f"| {kind} | {comp.label} | {comp.key} | {comp.a}: {score(o['a'])} | {comp.b}: {score(o['b'])} | "
            f"{o['diff']:+.3f} ± {Z * o['se']:.3f} ({_per_seed(o['per_seed'])}) | {test} | {_outcome_text(o)} |")


def showed(decision: dict) -> str:
    """One line: what the world showed (a vs b, verdict), premises where they failed."""
    if decision["verdict"] == NO_REPORT:
        return "no report: the pipeline did not finish"
    parts = decision["comparisons"]
    if decision["verdict"] == CANNOT_SHOW and any(o["verdict"] != HELD for _, o in decision["premises"]):
        parts = [(c, o) for c, o in decision["premises"] if o["verdict"] != HELD]
    return "; ".join(f"{c.label}: {c.a} {score(o['a'])} vs {c.b} {score(o['b'])} ({_outcome_text(o)})"
                     for c, o in parts)


def summary_table(claims, decisions: dict[str, dict], link_prefix: str = "") -> str:
    lines = ["| claim | verdict | what the world showed (mean over seeds ± 95% interval) | runs |", "|---|---|---|---|"]
    for claim in claims:
        d = decisions[claim.id]
        link = f"[{claim.pipeline}]({link_prefix}{claim.pipeline}/)"
        lines.append(f"| {claim.id}. {claim.statement} | **{d['verdict']}** | {showed(d)} | {link} |")
    return "\n".join(lines)


def claim_section(claim: Claim, d: dict) -> str:
    head = (f"## {claim.id}. {claim.statement}\n\nPipeline `configs/pipelines/claims/{claim.pipeline}.yaml`, "
            f"runs [{claim.pipeline}/seed*/]({claim.pipeline}/). **Verdict: {d['verdict']}.**\n\n"
            f"Design: {claim.design}\n")
    if d["verdict"] == NO_REPORT and not d["comparisons"]:
        return head + "\nNo runs: the pipeline has not finished.\n"
    chosen = "".join(f"\n{name} per seed: {', '.join(picks)}." for name, picks in d["chosen"].items())
    table = ["| role | comparison | score | a | b | a − b ± 95% (per seed) | test | outcome |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, part in (("premise", "premises"), ("claim", "comparisons"), ("context", "context")):
        table += [comparison_row(kind, c, o) for c, o in d[part]]
    return "\n".join([head + chosen, "", f"What the world showed ({d['seeds']} seed{'s' * (d['seeds'] > 1)}): {showed(d)}.", "", *table,
                      "", f"What the tiny world cannot show: {claim.limits}", ""])
