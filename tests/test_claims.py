"""experiments.claims: the claims pipelines validate, and claims.md is decided and written from hand-made reports.

Nothing here trains or evaluates: every forgetting.json is built in the test with the shape the pipeline writes.
"""
import json
import math
from pathlib import Path

import pytest

import posttrain.stages  # noqa: F401  (registers stage kinds)
from experiments import claims as C
from posttrain.config import load_pipeline

PIPELINES = sorted({c.pipeline for c in C.CLAIMS})


def _report(rows: dict[str, dict[str, tuple[float, float | None]]]) -> dict:
    """A forgetting.json with one stage record per row: {name: {key: (value, stderr)}}."""
    return {"stages": [{"name": name, "model": f"/m/{name}", "parents": [],
                        "scores": {k: {"value": v, "stderr": se} for k, (v, se) in scores.items()}}
                       for name, scores in rows.items()],
            "tasks": {}, "summary": {}}


def _write(runs: Path, name: str, report: dict) -> None:
    folder = runs / name / "report"
    folder.mkdir(parents=True)
    (folder / "forgetting.json").write_text(json.dumps(report))


@pytest.mark.parametrize("name", PIPELINES)
def test_every_claims_pipeline_validates_and_names_the_rows_its_claims_compare(name):
    cfg = load_pipeline(C.CLAIMS_DIR / f"{name}.yaml")
    rows = {"base"} | {s.name for s in cfg.stages}
    rows |= {f"input:{ref}" for s in cfg.stages for ref in s.reference_models()}
    for claim in (c for c in C.CLAIMS if c.pipeline == name):
        for comp in claim.premises + claim.comparisons + claim.context:
            assert {comp.a, comp.b} <= rows, (claim.id, comp.label)


def test_every_yaml_in_the_claims_folder_is_a_claim():
    assert sorted(p.stem for p in C.CLAIMS_DIR.glob("*.yaml")) == PIPELINES


def test_compare_uses_twice_the_combined_stderr():
    out = C.compare({"value": 0.9, "stderr": 0.03}, {"value": 0.7, "stderr": 0.04})
    assert out["diff"] == pytest.approx(0.2) and out["se"] == pytest.approx(0.05)
    assert out["verdict"] == C.HELD  # 0.2 > 2 * 0.05
    assert C.compare({"value": 0.7, "stderr": 0.04}, {"value": 0.9, "stderr": 0.03})["verdict"] == C.NOT_HELD
    assert C.compare({"value": 0.8, "stderr": 0.03}, {"value": 0.7, "stderr": 0.04})["verdict"] == C.NOT_SIGNIFICANT
    # exactly 2 se apart is not significant; a missing stderr counts as 0
    assert C.compare({"value": 0.5, "stderr": 0.0}, {"value": 0.4, "stderr": 0.05})["verdict"] == C.NOT_SIGNIFICANT
    assert C.compare({"value": 0.0, "stderr": None}, {"value": 0.0, "stderr": 0.0})["verdict"] == C.NOT_SIGNIFICANT
    assert C.compare({"value": 0.01, "stderr": None}, {"value": 0.0, "stderr": None})["verdict"] == C.HELD


def _hft(arith_hft: float, arith_full: float, facts_hft: float = 0.5, facts_full: float = 0.5,
         learned: float = 0.9) -> dict:
    ar, fa = C.ARITH, C.FACTS
    return _report({
        "base": {ar: (0.02, 0.014), fa: (0.86, 0.049)},
        "full_arithmetic": {ar: (learned, 0.03), fa: (0.2, 0.057)},
        "full_reversal": {ar: (arith_full, 0.04), fa: (facts_full, 0.05), C.REV: (0.9, 0.03)},
        "hft_arithmetic": {ar: (learned, 0.03), fa: (0.3, 0.065)},
        "hft_reversal": {ar: (arith_hft, 0.04), fa: (facts_hft, 0.05), C.REV: (0.8, 0.04)},
    })


CLAIM1 = next(c for c in C.CLAIMS if c.id == "1")


@pytest.mark.parametrize("report, verdict", [
    (_hft(0.7, 0.3, 0.7, 0.3), C.HELD),             # both comparisons clear 2 se
    (_hft(0.7, 0.3), C.NOT_SIGNIFICANT),            # facts equal: one held, one not significant
    (_hft(0.7, 0.3, 0.2, 0.6), C.NOT_HELD),         # facts go the other way
    (_hft(0.7, 0.3, 0.7, 0.3, learned=0.03), C.CANNOT_SHOW),  # arithmetic never learned: no premise
    (None, C.NO_REPORT),
])
def test_decide_combines_comparisons_and_premises(report, verdict):
    assert C.decide(CLAIM1, report)["verdict"] == verdict


def test_a_missing_score_is_no_report_not_a_verdict():
    report = _hft(0.7, 0.3, 0.7, 0.3)
    del report["stages"][4]["scores"][C.FACTS]
    d = C.decide(CLAIM1, report)
    assert d["verdict"] == C.NO_REPORT
    assert "no score (hft_reversal world_facts/acc)" in C.claim_section(CLAIM1, d)


def test_claims_md_copies_the_reports_numbers_and_cites_them(tmp_path):
    _write(tmp_path, "hft_vs_full", _hft(0.73, 0.31, 0.62, 0.18))
    assert C.main(["--no-run", "--runs", str(tmp_path)]) == 0
    md = (tmp_path / "claims.md").read_text()
    summary = md.split("## 1.")[0]
    # the claim's row in the summary: verdict, both scores with stderr as in the report, and the cited report
    row = next(line for line in summary.splitlines() if line.startswith("| 1."))
    assert "**held**" in row and "[hft_vs_full](hft_vs_full/report/forgetting.md)" in row
    assert "hft_reversal 0.73 ± 0.040 vs full_reversal 0.31 ± 0.040 (held)" in row
    assert "hft_reversal 0.62 ± 0.050 vs full_reversal 0.18 ± 0.050 (held)" in row
    # the claim's table: a − b and 2·se, from the same numbers
    diff, two_se = 0.73 - 0.31, 2 * math.sqrt(2 * 0.04 ** 2)
    assert f"| {diff:+.2f} | {two_se:.3f} | held |" in md
    assert "What the tiny world cannot show:" in md.split("## 1.")[1]
    # the claims whose pipelines never ran say so, and no number is invented for them
    for claim in C.CLAIMS[1:]:
        assert f"| {claim.id}. {claim.statement} | **no report** |" in summary


def test_merge_claim_reads_the_specialists_reference_rows(tmp_path):
    ar, rv = C.ARITH, C.REV
    merges = {"linear": (0.2, 0.1), "task_arithmetic": (0.5, 0.4), "ties": (0.6, 0.5), "dare_linear": (0.55, 0.12),
              "breadcrumbs": (0.5, 0.41)}
    rows = {"base": {ar: (0.02, 0.014), rv: (0.0, 0.0)},
            "input:world-sft-arithmetic": {ar: (0.95, 0.022), rv: (0.0, 0.0)},
            "input:world-sft-reversal": {ar: (0.03, 0.017), rv: (0.9, 0.03)}}
    rows |= {m: {ar: (a, 0.05), rv: (r, 0.04)} for m, (a, r) in merges.items()}
    _write(tmp_path, "merge_methods", _report(rows))
    C.main(["--no-run", "--runs", str(tmp_path)])
    md = (tmp_path / "claims.md").read_text()
    claim4a = next(c for c in C.CLAIMS if c.id == "4a")
    assert f"| 4a. {claim4a.statement} | **not significant** |" in md
    assert "dare_linear keeps more of reversal than linear: dare_linear 0.12 ± 0.040 vs linear 0.10 ± 0.040 " \
           "(not significant)" in md
    assert "| 4b. Breadcrumbs keeps more of each specialist than task arithmetic. | **not significant** |" in md


def test_update_readme_replaces_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- claims:begin -->\nold\n<!-- claims:end -->\ntail\n")
    assert C.update_readme("| new |", readme)
    assert readme.read_text() == "# x\n<!-- claims:begin -->\n| new |\n<!-- claims:end -->\ntail\n"
    readme.write_text("no markers\n")
    assert not C.update_readme("| new |", readme) and readme.read_text() == "no markers\n"


def _merges(scores: dict[str, tuple[float, float, float, float]]) -> dict:
    """merge_methods report: {method: (arith, arith_se, reversal, reversal_se)} plus base and specialists."""
    ar, rv = C.ARITH, C.REV
    rows = {"base": {ar: (0.01, 0.01), rv: (0.0, 0.0)},
            "input:world-sft-arithmetic": {ar: (0.95, 0.022), rv: (0.0, 0.0)},
            "input:world-sft-reversal": {ar: (0.0, 0.0), rv: (0.7, 0.046)}}
    return _report(rows | {m: {ar: (a, a_se), rv: (r, r_se)} for m, (a, a_se, r, r_se) in scores.items()})


def test_comparisons_all_at_floor_cannot_show_and_a_floor_never_makes_a_claim_hold():
    floor = (0.0, 0.0, 0.0, 0.0)
    report = _merges({"linear": (0.03, 0.017, 0.0, 0.0), "task_arithmetic": floor, "ties": (0.01, 0.01, 0.0, 0.0),
                      "dare_linear": floor, "breadcrumbs": (0.06, 0.024, 0.0, 0.0)})
    claim4a, claim4b = (next(c for c in C.CLAIMS if c.id == i) for i in ("4a", "4b"))
    d4a = C.decide(claim4a, report)
    assert d4a["verdict"] == C.CANNOT_SHOW and all(o["floor"] for _, o in d4a["comparisons"])
    assert "| -0.02 | 0.039 | not significant; both at floor |" in C.claim_section(claim4a, d4a)
    # 4b: breadcrumbs' arithmetic (0.06 > 2 x 0.024) is off the floor and beats task arithmetic; reversal is at
    # floor on both sides, which stays "not significant" in the combination, so the claim is not held up by it
    d4b = C.decide(claim4b, report)
    assert [o["verdict"] for _, o in d4b["comparisons"]] == [C.HELD, C.NOT_SIGNIFICANT]
    assert [o["floor"] for _, o in d4b["comparisons"]] == [False, True]
    assert d4b["verdict"] == C.NOT_SIGNIFICANT
