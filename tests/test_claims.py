"""experiments.claims: the claims pipelines validate, the paired test and the matched-gain rule compute what they
say, and claims.md is decided and written from hand-made per-example scores.

Nothing here trains or evaluates: every eval.json is built in the test with the shape evals/runner.py writes
with `eval.log_samples`.
"""
import json
import math
from pathlib import Path
from statistics import stdev

import pytest

import posttrain.stages  # noqa: F401  (registers stage kinds)
from experiments import claims as C
from experiments import claims_decide as D
from experiments import claims_stats as S
from posttrain.config import load_pipeline

PIPELINES = sorted({c.pipeline for c in C.CLAIMS})


# ------------------------------------------------------------------------------------------- the statistics


def test_paired_test_by_hand():
    a = [[1, 1, 0, 1], [1, 0, 1, 1]]
    b = [[0, 1, 0, 0], [1, 0, 0, 0]]
    out = S.paired(a, b)
    # d = [[1,0,0,1],[0,0,1,1]]: seed means 0.5, 0.5 (no seed spread); item means 0.5, 0, 0.5, 1 (variance 1/6)
    assert out["diff"] == pytest.approx(0.5) and out["per_seed"] == [0.5, 0.5]
    assert out["se"] == pytest.approx(math.sqrt((1 / 6) / 4))
    assert out["verdict"] == S.HELD  # 0.5 > 2 x 0.204
    assert S.paired(b, a)["verdict"] == S.NOT_HELD
    assert S.paired(a, a)["verdict"] == S.NOT_SIGNIFICANT and S.paired(a, a, same=True)["verdict"] == S.HELD


def test_one_seed_is_the_usual_paired_test_and_seed_spread_widens_the_interval():
    a, b = [[1, 0, 1, 1, 0, 1]], [[0, 0, 1, 0, 0, 1]]
    d = [x - y for x, y in zip(a[0], b[0])]
    assert S.paired(a, b)["se"] == pytest.approx(stdev(d) / math.sqrt(len(d)))
    # the same items but the difference flips sign between seeds: the seed term makes it not significant
    a2, b2 = [[1] * 6, [0] * 6], [[0] * 6, [1] * 6]
    out = S.paired(a2, b2)
    assert out["diff"] == 0 and out["se"] == pytest.approx(math.sqrt(2 / 2)) and out["verdict"] == S.NOT_SIGNIFICANT
    with pytest.raises(ValueError, match="same seeds and examples"):
        S.paired([[1, 0]], [[1, 0, 1]])


def test_matched_rung_is_the_closest_and_ties_go_to_fewer_steps():
    assert S.closest(0.4, [0.1, 0.35, 0.5, 0.9]) == 1
    assert S.closest(0.3, [0.2, 0.4]) == 0  # equally close: the earlier rung
    with pytest.raises(ValueError):
        S.closest(0.3, [])


# ------------------------------------------------------------------------------------------- the claims


@pytest.mark.parametrize("name", PIPELINES)
def test_every_claims_pipeline_validates_scores_every_example_and_names_the_rows_its_claims_compare(name):
    cfg = load_pipeline(C.CLAIMS_DIR / f"{name}.yaml")
    assert cfg.eval.limit is None and cfg.eval.log_samples
    rows = {"base"} | {s.name for s in cfg.stages}
    rows |= {f"input:{ref}" for s in cfg.stages for ref in s.reference_models()}
    for claim in (c for c in C.CLAIMS if c.pipeline == name):
        for m in claim.matches:
            assert set(m.rungs) | {m.target} <= rows, (claim.id, m.name)
        names = rows | {m.name for m in claim.matches}
        for comp in claim.premises + claim.comparisons + claim.context:
            assert {comp.a, comp.b} <= names, (claim.id, comp.label)


def test_every_yaml_in_the_claims_folder_is_a_claim():
    assert sorted(p.stem for p in C.CLAIMS_DIR.glob("*.yaml")) == PIPELINES


def test_each_seed_sets_the_pipeline_seed_and_every_hft_mask_seed():
    args = C.overrides("hft_vs_full", 2)
    assert args == ["--set", "seed=2", "--set", "stages.hft_reversal.trainable.seed=2"]
    assert C.overrides("grpo_vs_sft", 1) == ["--set", "seed=1"]


def _items(values: list[float]) -> dict[int, float]:
    return dict(enumerate(values))


def _claim1_seed(hft_arith: list[float], full_arith: dict[int, list[float]], rev: dict[str, float],
                 n: int = 20) -> dict:
    """One seed's rows for claim 1: reversal scores per row (as a share of n examples), arithmetic per row."""
    def share(p: float) -> list[float]:
        k = round(p * n)
        return [1.0] * k + [0.0] * (n - k)

    facts = share(0.8)
    rows = {"base": {C.ARITH: _items(share(0.9)), C.FACTS: _items(facts), C.REV: _items(share(0.0))},
            "hft_reversal": {C.ARITH: _items(hft_arith), C.FACTS: _items(facts), C.REV: _items(share(rev["hft"]))}}
    for k, arith in full_arith.items():
        rows[f"full_reversal_{k}"] = {C.ARITH: _items(arith), C.FACTS: _items(facts),
                                      C.REV: _items(share(rev[k]))}
    return rows


CLAIM1 = next(c for c in C.CLAIMS if c.id == "1")


def test_claim1_compares_hft_with_the_full_rung_matched_on_reversal_in_each_seed():
    n = 20
    keep, lose = [1.0] * 16 + [0.0] * 4, [1.0] * 4 + [0.0] * 16
    rev = {"hft": 0.3, 100: 0.05, 200: 0.25, 300: 0.5, 400: 0.7, 800: 0.8}
    seeds = [_claim1_seed(keep, {k: lose for k in (100, 200, 300, 400, 800)}, rev, n) for _ in range(3)]
    d = D.decide(CLAIM1, seeds)
    assert d["chosen"] == {"full_matched": ["full_reversal_200"] * 3}  # 0.25 is closest to HFT's 0.30
    arith = next(o for c, o in d["comparisons"] if c.key == C.ARITH)
    assert arith["diff"] == pytest.approx(0.6) and arith["verdict"] == S.HELD
    facts = next(o for c, o in d["comparisons"] if c.key == C.FACTS)
    assert facts["diff"] == 0 and facts["verdict"] == S.NOT_SIGNIFICANT
    assert d["verdict"] == S.NOT_SIGNIFICANT  # one comparison held, one not significant
    # a ladder whose closest rung is far from HFT: the "gained the same" premise fails, so it cannot show
    far = {**rev, 100: 0.9, 200: 0.9, 300: 0.9, 400: 0.9, 800: 0.9}
    d2 = D.decide(CLAIM1, [_claim1_seed(keep, {k: lose for k in far if k != "hft"}, far, n) for _ in range(3)])
    assert d2["verdict"] == D.CANNOT_SHOW
    assert "the two gained the same on reversal" in D.showed(d2)


def test_a_missing_score_is_no_report_and_no_runs_is_no_report():
    seeds = [_claim1_seed([1.0] * 20, {k: [0.0] * 20 for k in (100, 200, 300, 400, 800)},
                          {"hft": 0.3, 100: 0.1, 200: 0.3, 300: 0.5, 400: 0.7, 800: 0.8})]
    del seeds[0]["hft_reversal"][C.FACTS]
    d = D.decide(CLAIM1, seeds)
    assert d["verdict"] == D.NO_REPORT
    assert "no score (hft_reversal world_facts/acc)" in D.claim_section(CLAIM1, d)
    assert D.decide(CLAIM1, None)["verdict"] == D.NO_REPORT


def _write_run(run: Path, rows: dict, done: set[str]) -> None:
    """A seed's run dir as the pipeline leaves it: eval.json with items per row, DONE on finished stages."""
    for i, (name, scores) in enumerate(rows.items()):
        folder = run / "stages" / ("00_base" if name == "base" else f"{i:02d}_{name}")
        folder.mkdir(parents=True)
        items = {k: {"doc_id": list(v), "values": list(v.values())} for k, v in scores.items()}
        (folder / "eval.json").write_text(json.dumps({"scores": {}, "items": items}))
        if name in done:
            (folder / "DONE").write_text("{}")
    (run / "report").mkdir()
    (run / "report" / "forgetting.json").write_text("{}")


def test_read_rows_takes_finished_stages_only():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "seed0"
        _write_run(run, {"base": {C.ARITH: {0: 1.0}}, "a": {C.ARITH: {0: 0.0}}, "b": {C.ARITH: {0: 1.0}}}, {"a"})
        assert D.read_rows(run) == {"base": {C.ARITH: {0: 1.0}}, "a": {C.ARITH: {0: 0.0}}}


def test_claims_md_holds_the_numbers_the_runs_measured(tmp_path):
    keep, lose = [1.0] * 16 + [0.0] * 4, [1.0] * 4 + [0.0] * 16
    rev = {"hft": 0.3, 100: 0.05, 200: 0.25, 300: 0.5, 400: 0.7, 800: 0.8}
    for seed in range(3):
        rows = _claim1_seed(keep, {k: lose for k in (100, 200, 300, 400, 800)}, rev)
        _write_run(tmp_path / "hft_vs_full" / f"seed{seed}", rows, set(rows) - {"base"})
    assert C.main(["--no-run", "--runs", str(tmp_path)]) == 0
    md = (tmp_path / "claims.md").read_text()
    summary = md.split("## 1.")[0]
    row = next(line for line in summary.splitlines() if line.startswith("| 1."))
    assert "**not significant**" in row and "[hft_vs_full](hft_vs_full/)" in row
    assert "HFT keeps more arithmetic: hft_reversal 0.800 ± " in row and "vs full_matched 0.200 ± " in row
    assert "full_matched per seed: full_reversal_200, full_reversal_200, full_reversal_200." in md
    assert "+0.600 ±" in md and "(+0.60 / +0.60 / +0.60)" in md
    assert "What the tiny world cannot show:" in md.split("## 1.")[1] and "Design: " in md
    assert "se² = var_s(mean_i d[s]) / S" in md  # the rule is printed from the code that applies it
    for claim in C.CLAIMS[1:]:  # claims whose runs are missing say so, with no number invented
        assert f"| {claim.id}. {claim.statement} | **no report** |" in summary


def test_update_readme_replaces_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- claims:begin -->\nold\n<!-- claims:end -->\ntail\n")
    assert C.update_readme("| new |", readme)
    assert readme.read_text() == "# x\n<!-- claims:begin -->\n| new |\n<!-- claims:end -->\ntail\n"
    readme.write_text("no markers\n")
    assert not C.update_readme("| new |", readme) and readme.read_text() == "no markers\n"


def test_comparisons_all_at_floor_cannot_show():
    claim4a = next(c for c in C.CLAIMS if c.id == "4a")
    zero, learned = _items([0.0] * 10), _items([1.0] * 9 + [0.0])
    rows = {"base": {C.ARITH: zero, C.REV: zero}, "spec_arithmetic": {C.ARITH: learned, C.REV: zero},
            "spec_reversal": {C.ARITH: zero, C.REV: learned}}
    rows |= {m: {C.ARITH: zero, C.REV: zero} for m in ("linear", "ties", "dare_linear")}
    d = D.decide(claim4a, [rows, rows])
    assert d["verdict"] == D.CANNOT_SHOW and all(o["floor"] for _, o in d["comparisons"])
    assert "not significant; both at floor" in D.claim_section(claim4a, d)
