"""Forgetting metrics against a hand-computed score matrix, and the report files they render.

Every score is a multiple of 1/8, so every difference, mean and sum below is exact in binary floating point
and the expected numbers can be written literally and compared with ==.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from evals.backward import backward_transfer
from evals.forgetting import (average_forgetting, changes_vs_parent, check_gate,
                              deltas_vs_base, deltas_vs_previous, forgetting, forgetting_drops, max_drop,
                              score_matrix, significant_drops)
from evals.report import write_report
from evals.summary import build_report

# Hand-made pipeline. Keys sort as chat/win, code/pass, math/acc, math/em; math has two metrics.
#
#   stage  trains_on   chat/win  code/pass  math/acc  math/em
#   base   -           0.500     0.250      0.375     0.250
#   sft    math        0.375     0.250      0.750     0.625
#   dpo    chat        0.750     0.000      0.625     0.500
#   grpo   code        0.375     0.500      0.500     0.125
TABLE = {
    "base": (None, [0.500, 0.250, 0.375, 0.250]),
    "sft": (["math"], [0.375, 0.250, 0.750, 0.625]),
    "dpo": (["chat"], [0.750, 0.000, 0.625, 0.500]),
    "grpo": (["code"], [0.375, 0.500, 0.500, 0.125]),
}
KEYS = ["chat/win", "code/pass", "math/acc", "math/em"]


def make_stages() -> list[dict]:
    stages = []
    for name, (trains_on, values) in TABLE.items():
        # Only chat/win has a stderr, so the md must show both the "± stderr" and the bare form.
        scores = {k: {"value": v, "stderr": 0.02 if k == "chat/win" else None} for k, v in zip(KEYS, values)}
        stage = {"name": name, "model": f"runs/x/{name}", "scores": scores}
        if trains_on:
            stage["trains_on"] = trains_on
        stages.append(stage)
    return stages


def test_score_matrix_and_deltas():
    keys, m = score_matrix(make_stages())
    assert keys == KEYS
    assert m.tolist() == [values for _, values in TABLE.values()]
    # grpo - base: 0.375-0.5, 0.5-0.25, 0.5-0.375, 0.125-0.25
    assert deltas_vs_base(make_stages())[-1].tolist() == [-0.125, 0.25, 0.125, -0.125]
    assert deltas_vs_base(make_stages())[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    # grpo - dpo: 0.375-0.75, 0.5-0.0, 0.5-0.625, 0.125-0.5
    d_prev = deltas_vs_previous(make_stages())
    assert d_prev[-1].tolist() == [-0.375, 0.5, -0.125, -0.375]
    assert np.isnan(d_prev[0]).all()


def test_forgetting_by_hand():
    # f[k, j] = max(score[0..k-1, j]) - score[k, j]
    # sft : chat 0.5-0.375=0.125   code 0.25-0.25=0     acc 0.375-0.75=-0.375  em 0.25-0.625=-0.375
    # dpo : chat 0.5-0.75=-0.25    code 0.25-0=0.25     acc 0.75-0.625=0.125   em 0.625-0.5=0.125
    # grpo: chat 0.75-0.375=0.375  code 0.25-0.5=-0.25  acc 0.75-0.5=0.25      em 0.625-0.125=0.5
    assert forgetting(make_stages()).tolist() == [
        [0.0, 0.0, 0.0, 0.0],
        [0.125, 0.0, -0.375, -0.375],
        [-0.25, 0.25, 0.125, 0.125],
        [0.375, -0.25, 0.25, 0.5],
    ]
    # Average forgetting at grpo, which trains code: over chat, math/acc, math/em only, (0.375 + 0.25 + 0.5) / 3.
    # (The signed mean over every key, 0.875 / 4, let grpo's own gain on code, -0.25, offset the rest.)
    assert average_forgetting(make_stages()) == 0.375
    # sft trains math: chat 0.125 and code 0 -> 0.0625. dpo trains chat: code 0.25, math 0.125 and 0.125.
    assert average_forgetting(make_stages(), at=1) == 0.0625
    assert average_forgetting(make_stages(), at=2) == pytest.approx(0.5 / 3)
    assert average_forgetting(make_stages(), at=0) is None  # the base forgets nothing
    # Only tasks an ancestor trained (Chaudhry's set): dpo: math (sft) -> 0.125; grpo: math and chat -> 0.375;
    # sft: no ancestor trains anything.
    assert average_forgetting(make_stages(), at=2, earlier_only=True) == 0.125
    assert average_forgetting(make_stages(), at=3, earlier_only=True) == 0.375
    assert average_forgetting(make_stages(), at=1, earlier_only=True) is None


def test_max_drop_by_hand():
    # base - score over later stages; the largest is code/pass at dpo: 0.25 - 0.0.
    # (next: chat/win at sft and grpo, math/em at grpo, all 0.125)
    assert max_drop(make_stages()) == {"drop": 0.25, "stage": "dpo", "key": "code/pass"}
    # Nothing below base -> 0.0 with no stage; base only -> nothing to compare.
    up = make_stages()[:1] + [{"name": "up", "scores": {"chat/win": {"value": 0.625}}}]
    assert max_drop(up) == {"drop": 0.0, "stage": None, "key": None}
    assert max_drop(make_stages()[:1]) == {"drop": None, "stage": None, "key": None}


def test_forgetting_drops_by_hand():
    # Per stage, the keys it does not train that fell below their best ancestor score (only chat/win has a
    # stderr, 0.02 everywhere: threshold 2 * sqrt(2) * 0.02; the others' threshold is 0).
    # sft (math): chat 0.5 (base) -> 0.375; code stayed at 0.25: not a drop.
    sft = forgetting_drops(make_stages(), at=1)
    assert [(d["key"], d["reference"], d["before"], d["after"], d["drop"], d["significant"]) for d in sft] == [
        ("chat/win", "base", 0.5, 0.375, 0.125, True)]
    assert sft[0]["threshold"] == pytest.approx(2 * math.sqrt(2) * 0.02)
    # dpo (chat): code 0.25 at base and sft, the earliest kept -> 0.0; math/acc 0.75 (sft) -> 0.625; math/em
    # 0.625 (sft) -> 0.5. Larger first; equal drops in key order.
    assert [(d["key"], d["reference"], d["drop"]) for d in forgetting_drops(make_stages(), at=2)] == [
        ("code/pass", "base", 0.25), ("math/acc", "sft", 0.125), ("math/em", "sft", 0.125)]
    # grpo (code): math/em 0.625 (sft) -> 0.125, chat 0.75 (dpo) -> 0.375, math/acc 0.75 (sft) -> 0.5.
    assert [(d["key"], d["reference"], d["drop"]) for d in forgetting_drops(make_stages())] == [
        ("math/em", "sft", 0.5), ("chat/win", "dpo", 0.375), ("math/acc", "sft", 0.25)]
    assert forgetting_drops(make_stages(), at=0) == []


def test_a_significant_drop_comes_before_a_larger_noisy_one():
    # w falls 0.25 with stderrs 0.125: threshold 2 * sqrt(2) * 0.125 = 0.354, not significant. v falls 0.125
    # with no stderr: significant. The headline is v.
    stages = [{"name": "base", "scores": {"w/acc": {"value": 0.75, "stderr": 0.125}, "v/acc": {"value": 0.5}}},
              {"name": "s", "scores": {"w/acc": {"value": 0.5, "stderr": 0.125}, "v/acc": {"value": 0.375}}}]
    drops = forgetting_drops(stages)
    assert [(d["key"], d["drop"], d["significant"]) for d in drops] == [("v/acc", 0.125, True), ("w/acc", 0.25, False)]
    assert build_report(stages)["summary"]["headline"]["key"] == "v/acc"


def test_gain_on_trained_tasks_by_hand():
    # Against the first parent: sft trains math (from base): 0.375 -> 0.75 and 0.25 -> 0.625; dpo trains chat
    # (from sft): 0.375 -> 0.75; grpo trains code (from dpo): 0.0 -> 0.5.
    assert [(g["key"], g["before"], g["after"], g["change"]) for g in changes_vs_parent(make_stages(), at=1)] == [
        ("math/acc", 0.375, 0.75, 0.375), ("math/em", 0.25, 0.625, 0.375)]
    summaries = build_report(make_stages())["stage_summaries"]
    assert [(s["stage"], s["compared_with"], s["gain"]) for s in summaries] == [
        ("sft", "base", 0.375), ("dpo", "sft", 0.375), ("grpo", "dpo", 0.5)]
    assert [s["forgetting"] for s in summaries] == [0.0625, pytest.approx(0.5 / 3), 0.375]
    assert [s["forgetting_earlier_tasks"] for s in summaries] == [None, 0.125, 0.375]
    assert [s["significant_drops"] for s in summaries] == [
        ["chat/win"], ["code/pass", "math/acc", "math/em"], ["math/em", "chat/win", "math/acc"]]
    # No other key rose over its parent anywhere in this table; a stage without trains_on has no gain.
    assert [s["side_gains"] for s in summaries] == [[], [], []]
    assert changes_vs_parent(with_trains_on(sft=[]), at=1) == []


# The issue's `make stage=sft` (world suite): arithmetic trained 0.02 -> 0.96, facts 0.86 -> 0.16, verifiable
# 0.02 -> 0.24 on the side. The signed mean over every key read -0.092, net remembering:
# (-0.94 + 0.70 + 0 + 0 - 0.22) / 5.
WORLD_KEYS = ["world_arithmetic/exact_match", "world_facts/acc", "world_reversal/exact_match",
              "world_style/exact_match", "world_verifiable/exact_match"]


def world_sft_rows() -> list[dict]:
    def row(name, values, stderrs, **extra):
        return {"name": name, "model": f"/cache/{name}", "trains_on": [], **extra,
                "scores": {k: {"value": v, "stderr": e} for k, v, e in zip(WORLD_KEYS, values, stderrs)}}

    return [row("base", [0.02, 0.86, 0.0, 0.0, 0.02], [0.014, 0.035, 0.0, 0.0, 0.014], model_ref="world"),
            row("sft", [0.96, 0.16, 0.0, 0.0, 0.24], [0.02, 0.037, 0.0, 0.0, 0.043], trains_on=["world_arithmetic"])]


def test_issue_sft_example_headlines_the_facts_drop(tmp_path):
    report = write_report(world_sft_rows(), str(tmp_path))
    summary = report["summary"]
    # Headline: facts fell 0.70 (threshold 2 * sqrt(0.035^2 + 0.037^2) = 0.102): significant.
    head = summary["headline"]
    assert (head["stage"], head["key"], head["significant"]) == ("sft", "world_facts/acc", True)
    assert head["drop"] == pytest.approx(0.70)
    # Average forgetting over the 4 keys sft does not train, the gain on verifiable counted as 0: 0.70 / 4.
    assert summary["average_forgetting"] == pytest.approx(0.175) and summary["forgetting_keys"] == 4
    assert summary["gain_on_trained"] == pytest.approx(0.94)
    side = report["stage_summaries"][0]["side_gains"]
    assert [g["key"] for g in side] == ["world_verifiable/exact_match"] and side[0]["change"] == pytest.approx(0.22)
    md = (tmp_path / "forgetting.md").read_text()
    summary_md = md.split("## Summary")[1].split("##")[0]
    first = next(line for line in summary_md.splitlines() if line.startswith("- "))
    assert first == "- **Forgetting at `sft`: world_facts/acc -0.700 (0.860 -> 0.160 vs `base`), significant**"
    assert "- Average forgetting at `sft`: 0.175 over the 4 keys it does not train" in md
    assert "-0.092" not in md
    assert "Base: `world` (`/cache/base`)" in md and "| base (world) " in md


def test_backward_transfer_by_hand():
    # Training stages: sft (math), dpo (chat), grpo (code); T = grpo, the final stage.
    # math: R_T = mean(0.5, 0.125) = 0.3125, R_sft = mean(0.75, 0.625) = 0.6875 -> -0.375
    # chat: R_T = 0.375, R_dpo = 0.75                                           -> -0.375
    # BWT = (-0.375 - 0.375) / 2
    assert backward_transfer(make_stages()) == -0.375


def test_backward_transfer_reads_final_stage_and_needs_two_training_stages():
    # A trailing merge (no trains_on) is where R_T is read:
    # math: mean(0.75, 0.5) - 0.6875 = -0.0625; chat: 0.5 - 0.75 = -0.25; BWT = -0.3125 / 2
    merge = {"name": "merge", "scores": {k: {"value": v} for k, v in zip(KEYS, [0.5, 0.5, 0.75, 0.5])}}
    assert backward_transfer(make_stages() + [merge]) == -0.15625
    assert backward_transfer(make_stages()[:2]) is None
    no_trains = [dict(s, trains_on=[]) for s in make_stages()]
    assert backward_transfer(no_trains) is None


def test_missing_score_is_nan_and_null_in_json():
    stages = make_stages()
    del stages[2]["scores"]["math/em"]  # dpo did not score math/em
    keys, m = score_matrix(stages)
    assert math.isnan(m[2, 3])
    f = forgetting(stages)
    assert math.isnan(f[2, 3])
    # the missing stage must not hide sft's 0.625 from grpo: 0.625 - 0.125
    assert f[3, 3] == 0.5
    report = build_report(stages)
    assert report["tasks"]["math/em"]["delta_vs_base"] == [0.0, 0.375, None, -0.125]
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN left anywhere


def sig_stages() -> list[dict]:
    # stderrs 3/64 and 4/64 make sqrt(a^2 + b^2) = 5/64 exactly, so z=2 gives a threshold of 0.15625.
    a, b = 0.046875, 0.0625
    return [
        {"name": "base", "scores": {"x/acc": {"value": 0.75, "stderr": a}, "y/acc": {"value": 0.75, "stderr": a},
                                    "z/acc": {"value": 0.5, "stderr": None}}},
        {"name": "s1", "scores": {"x/acc": {"value": 0.5, "stderr": b}, "y/acc": {"value": 0.625, "stderr": b},
                                  "z/acc": {"value": 0.375}}},
        {"name": "s2", "scores": {"x/acc": {"value": 0.375, "stderr": a}, "y/acc": {"value": 0.75, "stderr": a},
                                  "z/acc": {"value": 0.375, "stderr": None}}},
    ]


def test_significant_drops():
    flags = significant_drops(sig_stages())
    got = [(d["stage"], d["key"], d["against"], d["drop"]) for d in flags]
    assert got == [
        ("s1", "x/acc", "base", 0.25),   # 0.25 > 2 * 5/64 = 0.15625
        ("s1", "z/acc", "base", 0.125),  # no stderrs: threshold 0
        ("s2", "x/acc", "base", 0.375),  # threshold 2 * sqrt(2) * 3/64
        ("s2", "z/acc", "base", 0.125),
    ]
    # Not flagged: y/acc at s1 (0.125 < 0.15625); x/acc s2 vs s1 (0.125 < 0.15625); z/acc s2 vs s1 (0 > 0 is false).
    assert flags[0]["threshold"] == 0.15625 and flags[1]["threshold"] == 0.0
    assert flags[2]["threshold"] == pytest.approx(2 * math.sqrt(2) * 0.046875)
    # A looser z drops x/acc at s1 (threshold 0.3125 > 0.25) but keeps it at s2 vs base.
    assert [(d["stage"], d["key"]) for d in significant_drops(sig_stages(), z=4.0)] == [
        ("s1", "z/acc"), ("s2", "x/acc"), ("s2", "z/acc")]


def test_significant_drop_against_previous():
    stages = sig_stages()
    stages[2]["scores"]["y/acc"] = {"value": 0.375, "stderr": 0.0}  # 0.625 -> 0.375 after s1
    prev = [d for d in significant_drops(stages) if d["against"] == "previous"]
    assert [(d["stage"], d["key"], d["reference"], d["drop"]) for d in prev] == [("s2", "y/acc", "s1", 0.25)]
    assert prev[0]["threshold"] == 0.125  # 2 * sqrt(0.0625^2 + 0)


def test_gate():
    # Last stage grpo vs base: chat/win -0.125, code/pass +0.25, math/acc +0.125, math/em -0.125.
    msgs = check_gate(make_stages(), {"chat": 0.1, "math/em": 0.125, "code": 0.0, "math/acc": 0.0})
    assert len(msgs) == 1  # math/em sits exactly at its allowance, which passes
    assert "'grpo'" in msgs[0] and "chat/win" in msgs[0] and "0.125" in msgs[0]
    # A task name gates all its metrics; a full key overrides its task.
    msgs = check_gate(make_stages(), {"math": 0.1})
    assert len(msgs) == 1 and "math/em" in msgs[0]
    assert check_gate(make_stages(), {"math": 0.1, "math/em": 0.2}) == []
    assert check_gate(make_stages(), {}) == []
    # A gate that names nothing evaluated is reported, not passed.
    msgs = check_gate(make_stages(), {"maths": 0.1, "chat/acc": 0.1})
    assert len(msgs) == 2 and "'maths'" in msgs[0] and "'chat/acc'" in msgs[1]


def test_build_report_shape():
    report = build_report(make_stages())
    assert report["stages"] == make_stages()
    assert list(report["tasks"]) == KEYS
    assert report["tasks"]["code/pass"]["forgetting"] == [0.0, 0.0, 0.25, -0.25]
    assert report["tasks"]["code/pass"]["delta_vs_previous"] == [None, 0.0, -0.25, 0.5]
    assert report["summary"] == {
        "average_forgetting": 0.375, "forgetting_keys": 3, "average_forgetting_earlier_tasks": 0.375,
        "gain_on_trained": 0.5,  # grpo's code/pass, 0.0 at dpo -> 0.5
        "headline": {"stage": "grpo", "key": "math/em", "reference": "sft", "before": 0.625, "after": 0.125,
                     "drop": 0.5, "threshold": 0.0, "significant": True},
        "backward_transfer": -0.375, "backward_transfer_note": None,
        "max_drop": {"drop": 0.25, "stage": "dpo", "key": "code/pass"}}
    assert [s["stage"] for s in report["stage_summaries"]] == ["sft", "dpo", "grpo"]


def table_rows(md: str) -> dict[str, list[str]]:
    """Rows of the markdown tables in ``md`` as {first cell: other cells}; header and rule rows included."""
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ")}


def section(md: str, title: str) -> str:
    """The text of the md section `## title` (up to the next `## `)."""
    return md.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_write_report(tmp_path):
    out = tmp_path / "report"
    returned = write_report(make_stages(), str(out), extra_sections=["## HFT masks\n\nsft: half per layer"])
    assert sorted(os.listdir(out)) == ["forgetting.json", "forgetting.md", "forgetting.png"]  # no temp left
    assert (out / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    loaded = json.loads((out / "forgetting.json").read_text())
    assert loaded == returned == build_report(make_stages())

    md = (out / "forgetting.md").read_text()
    # The headline: grpo's largest significant drop (math/em, from its best ancestor score at sft).
    summary = section(md, "Summary").strip().splitlines()
    assert summary[0] == "- **Forgetting at `grpo`: math/em -0.500 (0.625 -> 0.125 vs `sft`), significant**"
    assert summary[1].startswith("- Average forgetting at `grpo`: 0.375 over the 3 keys it does not train")
    assert "- Gain on the tasks `grpo` trains: +0.500 (code/pass 0.000 -> 0.500 vs `dpo`)" in summary
    # Per stage: gain, forgetting, worst drop and significant drops, as stage_summaries holds them.
    per_stage = table_rows(section(md, "Per stage"))
    assert per_stage["grpo"] == ["dpo", "code", "+0.500", "0.375 over 3", "math/em -0.500*",
                                 "3: math/em, chat/win, math/acc"]
    assert per_stage["sft"][:5] == ["base", "math", "+0.375", "0.062 over 2", "chat/win -0.125*"]
    # The scores table: every input value, its stderr where given, and its delta vs base; the base row names
    # its model (its folder here: these rows carry no model_ref).
    rows = table_rows(section(md, "Scores"))
    assert rows["base (runs/x/base)"][1:] == ["0.500 ± 0.020", "0.250", "0.375", "0.250"]
    assert rows["dpo"] == ["chat", "0.750 ± 0.020 (+0.250)", "0.000 (-0.250)", "0.625 (+0.250)", "0.500 (+0.250)"]
    for name, (_, values) in TABLE.items():
        for v in values:
            assert f"{v:.3f}" in md
    # Forgetting per key: drops only, "trained" where the stage trains the task, and the row's average.
    forgot = table_rows(section(md, "Forgetting per stage"))
    assert forgot["grpo"] == ["0.375*", "trained", "0.250*", "0.500*", "0.375"]
    assert forgot["dpo"] == ["trained", "0.250*", "0.125*", "0.125*", "0.167"]
    assert forgot["sft"][:4] == ["0.125*", "0.000", "trained", "trained"] and "base" not in forgot
    assert "- `dpo` code/pass: -0.250 vs base (`base`), threshold 0.000" in md
    assert "Backward transfer (GEM): -0.375" in md
    assert md.rstrip().endswith("sft: half per layer")


def with_reference() -> list[dict]:
    """make_stages() with a reference row (an input of dpo) between sft and dpo that beats every stage."""
    stages = make_stages()
    ref = {"name": "input:spec", "model": "/models/spec", "reference": True, "input_of": "dpo", "trains_on": [],
           "scores": {k: {"value": 1.0, "stderr": None} for k in KEYS} | {"extra/acc": {"value": 0.5}}}
    return stages[:2] + [ref] + stages[2:]


def test_reference_rows_are_shown_but_not_measured():
    stages, plain = with_reference(), make_stages()
    report, want = build_report(stages), build_report(plain)
    # A reference at 1.0 everywhere would be the "best earlier score" of dpo and grpo, and dpo's "previous":
    # left out, every metric equals the run without it.
    assert report["summary"] == want["summary"]
    assert report["significant_drops"] == want["significant_drops"]
    keys, _ = score_matrix(stages)
    assert keys == ["chat/win", "code/pass", "extra/acc", "math/acc", "math/em"]
    assert np.delete(forgetting(stages), 2, axis=1).tolist() == forgetting(plain).tolist()
    assert check_gate(stages, {"chat": 0.1}) == check_gate(plain, {"chat": 0.1})
    assert report["stages"][2]["name"] == "input:spec" and len(report["stages"]) == 5
    # Per-key lists keep one entry per row: the reference has its delta vs base, no forgetting, no previous.
    code = report["tasks"]["code/pass"]
    assert code["delta_vs_base"] == [0.0, 0.0, 0.75, -0.25, 0.25]
    assert code["forgetting"] == [0.0, 0.0, None, 0.25, -0.25]
    assert code["delta_vs_previous"] == [None, 0.0, None, -0.25, 0.5]
    # A key only the reference scores is a column with nothing to measure.
    assert report["tasks"]["extra/acc"]["forgetting"] == [None] * 5


def test_report_md_shows_reference_rows_in_scores_only(tmp_path):
    write_report(with_reference(), str(tmp_path))
    md = (tmp_path / "forgetting.md").read_text()
    scores_md = section(md, "Scores")
    rows = table_rows(scores_md)
    assert rows["input:spec"][:2] == ["input of dpo", "1.000 (+0.500)"]
    assert list(rows).index("sft") < list(rows).index("input:spec") < list(rows).index("dpo")
    assert "input:spec" not in section(md, "Forgetting per stage") + section(md, "Per stage")
    assert "computed over the base and the stages only" in scores_md
    assert "computed over the base and the stages only" not in write_report_md(make_stages(), tmp_path / "plain")
    assert (tmp_path / "forgetting.png").read_bytes()[:4] == b"\x89PNG"


def write_report_md(stages: list[dict], out) -> str:
    write_report(stages, str(out))
    return (out / "forgetting.md").read_text()


# Branched pipeline (like configs/pipelines/hft_vs_full.yaml): two branches from the base, each a task then
# another. Keys sort as a/em, r/em.
#
#   row  stage   parents   trains_on  a/em   r/em
#   0    base    -         -          0.250  0.125
#   1    full_a  base      a          0.750  0.125
#   2    full_r  full_a    r          0.125  0.750
#   3    hft_a   base      a          0.625  0.250
#   4    hft_r   hft_a     r          0.500  0.625
BRANCHED = [
    ("base", [], None, [0.250, 0.125]),
    ("full_a", ["base"], ["a"], [0.750, 0.125]),
    ("full_r", ["full_a"], ["r"], [0.125, 0.750]),
    ("hft_a", ["base"], ["a"], [0.625, 0.250]),
    ("hft_r", ["hft_a"], ["r"], [0.500, 0.625]),
]


def branched(extra: list | None = None) -> list[dict]:
    rows = []
    for name, parents, trains_on, values in BRANCHED + (extra or []):
        rows.append({"name": name, "model": f"runs/b/{name}", "parents": parents, "trains_on": trains_on or [],
                     "scores": {k: {"value": v, "stderr": None} for k, v in zip(["a/em", "r/em"], values)}})
    return rows


def test_branched_forgetting_compares_with_ancestors_only():
    # f[k] = max over ancestors of score - score[k]
    # full_a: anc {base}:         0.25-0.75=-0.5      0.125-0.125=0
    # full_r: anc {base, full_a}: 0.75-0.125=0.625    0.125-0.75=-0.625
    # hft_a:  anc {base}:         0.25-0.625=-0.375   0.125-0.25=-0.125   (as a chain: 0.125, 0.5 vs full_*)
    # hft_r:  anc {base, hft_a}:  0.625-0.5=0.125     0.25-0.625=-0.375   (as a chain: 0.25, 0.125)
    assert forgetting(branched()).tolist() == [
        [0.0, 0.0], [-0.5, 0.0], [0.625, -0.625], [-0.375, -0.125], [0.125, -0.375]]
    # hft_r and full_r train r: their average is over a alone (r's gain no longer offsets a's loss).
    assert average_forgetting(branched()) == 0.125
    assert average_forgetting(branched(), at=2) == 0.625


def test_branched_delta_vs_parent():
    # full_a - base, full_r - full_a, hft_a - base (not hft_a - full_r), hft_r - hft_a
    d = deltas_vs_previous(branched())
    assert np.isnan(d[0]).all()
    assert d[1:].tolist() == [[0.5, 0.0], [-0.625, 0.625], [0.375, 0.125], [-0.125, 0.375]]


def test_branched_backward_transfer_counts_the_final_lineage():
    # At hft_r the lineage is base, hft_a, hft_r: one term, a: R_T 0.5 - R_hft_a 0.625. full_a's training
    # (a sibling branch) does not count.
    assert backward_transfer(branched()) == -0.125
    # At full_r: a: 0.125 - 0.75.
    assert backward_transfer(branched(), at=2) == -0.625
    report = build_report(branched())
    # Gains vs the parent on r: full_r 0.125 -> 0.75, hft_r 0.25 -> 0.625; each forgot a, which its parent trained.
    assert report["summary"]["branches"] == [
        {"stage": "full_r", "average_forgetting": 0.625, "forgetting_keys": 1, "average_forgetting_earlier_tasks": 0.625,
         "gain_on_trained": 0.625, "backward_transfer": -0.625, "backward_transfer_note": None,
         "headline": {"stage": "full_r", "key": "a/em", "reference": "full_a", "before": 0.75, "after": 0.125,
                      "drop": 0.625, "threshold": 0.0, "significant": True}},
        {"stage": "hft_r", "average_forgetting": 0.125, "forgetting_keys": 1, "average_forgetting_earlier_tasks": 0.125,
         "gain_on_trained": 0.375, "backward_transfer": -0.125, "backward_transfer_note": None,
         "headline": {"stage": "hft_r", "key": "a/em", "reference": "hft_a", "before": 0.625, "after": 0.5,
                      "drop": 0.125, "threshold": 0.0, "significant": True}}]


def test_branched_max_drop_drops_and_gate():
    # Below base: only a/em at full_r, 0.25 - 0.125. Every stage is compared with the base whatever its branch.
    assert max_drop(branched()) == {"drop": 0.125, "stage": "full_r", "key": "a/em"}
    # No stderrs: every drop is flagged. Against the parent: full_r vs full_a (a: 0.75 -> 0.125), hft_r vs
    # hft_a (a: 0.625 -> 0.5); hft_a is not compared with full_r (r: 0.75 -> 0.25 as a chain).
    got = [(d["stage"], d["key"], d["against"], d["reference"], d["drop"]) for d in significant_drops(branched())]
    assert got == [("full_r", "a/em", "base", "base", 0.125), ("full_r", "a/em", "previous", "full_a", 0.625),
                   ("hft_r", "a/em", "previous", "hft_a", 0.125)]
    # The gate reads the last stage against the base: hft_r holds a/em above base; full_r (last of [:3]) fell.
    assert check_gate(branched(), {"a": 0.0}) == []
    assert len(check_gate(branched()[:3], {"a": 0.1})) == 1


def test_merge_descends_from_every_input_stage():
    # merge from full_r and hft_r: every stage is an ancestor. Forgetting: max a 0.75 - 0.5, max r 0.75 - 0.75.
    # Delta vs its first parent full_r: 0.5 - 0.125, 0.75 - 0.75.
    # BWT at merge over trained full_a, full_r, hft_a (hft_r is T's last training stage):
    # a: 0.5 - 0.75 = -0.25; r: 0.75 - 0.75 = 0; a: 0.5 - 0.625 = -0.125 -> -0.375 / 3.
    stages = branched([("merge", ["full_r", "hft_r"], None, [0.5, 0.75])])
    assert forgetting(stages)[-1].tolist() == [0.25, 0.0]
    assert deltas_vs_previous(stages)[-1].tolist() == [0.375, 0.0]
    assert backward_transfer(stages) == -0.125
    assert "branches" not in build_report(stages)["summary"]  # one end: the merge
    # The merge names no trains_on: both keys count, (0.25 + 0) / 2; no gain figure.
    assert average_forgetting(stages) == 0.125
    assert build_report(stages)["summary"]["gain_on_trained"] is None


def test_stage_from_outside_the_run_has_no_ancestors():
    stages = branched([("ext", [], ["a"], [0.0, 0.0])])
    assert np.isnan(forgetting(stages)[-1]).all() and np.isnan(deltas_vs_previous(stages)[-1]).all()
    assert average_forgetting(stages) is None and forgetting_drops(stages) == [] and changes_vs_parent(stages) == []
    assert max_drop(stages) == {"drop": 0.25, "stage": "ext", "key": "a/em"}  # still compared with the base
    assert backward_transfer(stages) is None  # its lineage is itself


def test_linear_parents_give_the_numbers_of_a_chain():
    chain = make_stages()
    explicit = [dict(s, parents=[chain[i - 1]["name"]] if i else []) for i, s in enumerate(chain)]
    a, b = build_report(chain), build_report(explicit)
    assert a["tasks"] == b["tasks"] and a["summary"] == b["summary"]
    assert a["significant_drops"] == b["significant_drops"]


def test_report_md_shows_lineage_when_stages_branch(tmp_path):
    md = write_report_md(branched(), tmp_path / "b")
    scores_md = section(md, "Scores")
    header = next(line for line in scores_md.splitlines() if line.startswith("| stage"))
    assert [c.strip() for c in header.split("|")[1:4]] == ["stage", "from", "trains on"]
    rows = table_rows(scores_md)
    assert rows["base (runs/b/base)"][0] == "–" and rows["hft_a"][:2] == ["base", "a"] and rows["hft_r"][0] == "hft_a"
    assert table_rows(section(md, "Forgetting per stage"))["hft_a"] == ["trained", "0.000", "0.000"]
    assert table_rows(section(md, "Per stage"))["hft_r"][:2] == ["hft_a", "r"]
    assert ("- Branch ending at `full_r`: gain +0.625, average forgetting 0.625, largest drop a/em -0.625 "
            "(0.750 -> 0.125 vs `full_a`), significant, backward transfer -0.625") in md
    assert "- `hft_r` a/em: -0.125 vs parent (`hft_a`), threshold 0.000" in md
    assert "- Branch ending at `hft_r`: gain +0.375, average forgetting 0.125" in md
    assert "| from" not in section(write_report_md(make_stages(), tmp_path / "chain"), "Scores")
    merged = write_report_md(branched([("merge", ["full_r", "hft_r"], None, [0.5, 0.75])]), tmp_path / "m")
    assert table_rows(section(merged, "Scores"))["merge"][0] == "full_r, hft_r"
    assert table_rows(section(merged, "Per stage"))["merge"][:3] == ["full_r, hft_r", "–", "n/a"]


# ---- why BWT is n/a, the rows left out, file modes, the plot's stage names --------------------------------------


def with_trains_on(**trains_on: list[str]) -> list[dict]:
    """make_stages() with some stages' trains_on replaced."""
    return [dict(s, trains_on=trains_on[s["name"]]) if s["name"] in trains_on else s for s in make_stages()]


def test_backward_transfer_note_states_the_real_cause(tmp_path):
    from evals.backward import backward_transfer_note

    assert backward_transfer_note(make_stages()) is None  # every term there
    # Two training stages, the first naming a task no eval scored (a typo): BWT has no term, and the note says
    # so instead of "fewer than two stages name trains_on" (both do).
    typo = with_trains_on(sft=["maths"])[:3]
    assert backward_transfer(typo) is None
    assert backward_transfer_note(typo) == "`sft` trains_on names maths, which no eval scored (its term is left out)"
    md = write_report_md(typo, tmp_path / 'typo')
    assert "Backward transfer (GEM): n/a (`sft` trains_on names maths, which no eval scored" in md
    assert "fewer than two" not in md
    # Three training stages, one term lost: BWT is the chat term alone (-0.375), and the note says what is missing.
    assert backward_transfer(with_trains_on(sft=["maths"])) == -0.375
    md = write_report_md(with_trains_on(sft=["maths"]), tmp_path / "one")
    assert "Backward transfer (GEM): -0.375 (`sft` trains_on names maths" in md
    # One of two tasks unscored: the term keeps the other.
    assert backward_transfer(with_trains_on(sft=["math", "maths"])) == -0.375
    assert backward_transfer_note(with_trains_on(sft=["math", "maths"])) == (
        "`sft` trains_on names maths, which no eval scored (left out of its term)")
    # A task scored elsewhere but not at the final stage.
    gap = make_stages()
    del gap[-1]["scores"]["chat/win"]
    assert backward_transfer_note(gap) == "`dpo`'s trains_on tasks have no score there or at `grpo`"
    # Really fewer than two.
    assert backward_transfer_note(make_stages()[:2]) == "fewer than two stages in the report name trains_on"
    md = write_report_md(make_stages()[:2], tmp_path / "two")
    assert "n/a (fewer than two stages in the report name trains_on)" in md


def test_branch_notes_name_their_lineage():
    rows = branched()
    rows[1]["trains_on"] = ["aa"]  # full_a: a typo
    report = build_report(rows)
    notes = {b["stage"]: b["backward_transfer_note"] for b in report["summary"]["branches"]}
    assert notes == {"full_r": "`full_a` trains_on names aa, which no eval scored (its term is left out)",
                     "hft_r": None}


def test_report_lists_rows_left_out_and_stages_to_come(tmp_path):
    """write_report's not_comparable and pending: sections in the md, same-named lists in the JSON; a stage
    whose parent was left out reads "(left out)" in the from column, not "outside the run"."""
    stages = [dict(s, parents=[p]) for s, p in zip(make_stages(), [None, "base", "sft", "dpo"])]
    stages[0].pop("parents")
    kept = [s for s in stages if s["name"] != "dpo"]  # dpo left out
    left_out = [{"name": "dpo", "eval": "stages/02_dpo/eval.json", "why": ["limit 20 (pipeline: 50)"]}]
    out = tmp_path / "r"
    report = write_report(kept, str(out), not_comparable=left_out, pending=["ppo"])
    loaded = json.loads((out / "forgetting.json").read_text())
    assert loaded == report and loaded["not_comparable"] == left_out and loaded["pending"] == ["ppo"]
    assert [s["name"] for s in loaded["stages"]] == ["base", "sft", "grpo"]
    md = (out / "forgetting.md").read_text()
    assert "## Not comparable" in md and "- `dpo` (`stages/02_dpo/eval.json`): limit 20 (pipeline: 50)" in md
    assert "## Not yet evaluated in this run" in md and "`ppo`: a row appears" in md
    assert table_rows(md.split("## Not comparable")[0])["grpo"][0] == "dpo (left out)"
    # Nothing given: neither section nor key.
    plain = write_report(make_stages(), str(tmp_path / "p"))
    assert "not_comparable" not in plain and "pending" not in plain
    md = (tmp_path / "p" / "forgetting.md").read_text()
    assert "Not comparable" not in md and "Not yet evaluated" not in md


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_report_files_follow_the_umask(tmp_path, umask):
    """forgetting.{json,md,png} get 0o666 less the umask, as files open() makes do (mkstemp made them 0600)."""
    old = os.umask(umask)
    try:
        write_report(make_stages(), str(tmp_path / "r"))
    finally:
        os.umask(old)
    for name in ("forgetting.json", "forgetting.md", "forgetting.png"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def lines_axes(fig):
    """The "Scores across stages" panel of the report's figure."""
    return next(ax for ax in fig.axes if ax.get_title().startswith("Scores across stages"))


def _label_collisions(fig) -> list[tuple[str, str]]:
    """Neighbouring x tick labels that touch: their boxes when horizontal; when slanted, whether the gap
    between their parallel baselines (tick spacing * sin(angle)) is under one line of text."""
    ax = lines_axes(fig)
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    out = []
    for a, b in zip(labels, labels[1:]):
        angle = math.radians(a.get_rotation())
        if angle == 0:
            touch = a.get_window_extent(renderer).x1 >= b.get_window_extent(renderer).x0
        else:
            spacing = ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0]
            touch = spacing * math.sin(angle) < a.get_fontsize() * fig.dpi / 72
        if touch:
            out.append((a.get_text(), b.get_text()))
    return out


def world_rows(names: list[str]) -> list[dict]:
    """Rows with the world suite's five keys (whose legend narrows the axes) under the given stage names."""
    keys = ["world_arithmetic/exact_match", "world_facts/acc", "world_reversal/exact_match",
            "world_style/exact_match", "world_verifiable/exact_match"]
    return [{"name": n, "scores": {k: {"value": 0.5, "stderr": 0.1} for k in keys}} for n in names]


def test_stage_names_on_the_plot_do_not_run_into_each_other():
    from evals.plot import render_figure

    # The tester's runs/ms: "sft_arithmeticsft_reversal" on the x axis.
    fig = render_figure(world_rows(["base", "sft_arithmetic", "sft_reversal", "merge"]))
    assert _label_collisions(fig) == []
    # Short names that fit stay level.
    fig = render_figure(world_rows(["base", "sft", "dpo"]))
    assert _label_collisions(fig) == [] and lines_axes(fig).get_xticklabels()[1].get_rotation() == 0
    # Many long names: level they would touch, so they are slanted.
    fig = render_figure(world_rows(["base"] + [f"stage_{i}_with_a_long_name" for i in range(9)]))
    assert _label_collisions(fig) == [] and lines_axes(fig).get_xticklabels()[1].get_rotation() == 30
