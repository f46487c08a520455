"""Pipeline runner: stage references (tiny training runs). Reruns, tampering and the run-dir layout are tested in
tests/reliability/test_rerun.py."""
import json
from pathlib import Path

import pytest

import posttrain.stages  # noqa: F401
from posttrain.config import ConfigError, load_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.world.tuning import world_trainer

TINY = world_trainer("sft", max_steps=3, per_device_train_batch_size=4, logging_steps=1, save_steps=2)


def test_stage_reference_and_unknown_reference(world, tmp_path):
    stages = [
        {"name": "a", "kind": "sft", "data": [{"source": "arithmetic", "limit": 8}], "trainer": dict(TINY)},
        {"name": "b", "kind": "sft", "model": "world", "data": [{"source": "reversal", "limit": 8}], "trainer": dict(TINY)},
        {"name": "c", "kind": "sft", "model": "${stages.a.model}", "data": [{"source": "facts", "limit": 8}],
         "trainer": dict(TINY)},
    ]
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": stages})
    logs = []
    run_pipeline(cfg, tmp_path / "r", logs.append)
    started = [line for line in logs if "] sft from" in line]
    assert str(tmp_path / "r" / "stages" / "01_a" / "model") in started[2]
    stages[2]["model"] = "${stages.zz.model}"  # refused when the config loads, before any stage trains
    with pytest.raises(ConfigError, match=r"stages\[2\]\.model: \$\{stages\.zz\.model\} names no earlier stage"):
        load_pipeline(None, data={"eval": {"enabled": False}, "stages": stages})


@pytest.mark.slow  # five evals and a rerun: about 50 s on two shared cores
def test_input_models_are_evaluated_once_as_reference_rows(world, tmp_path):
    """A merge's specialists get a reference row each, before the merge, with the numbers of their eval.json;
    an input already shown (the base, a specialist named again) gets no second row; a rerun reuses the evals."""
    stages = [
        {"name": "m", "kind": "merge", "method": "ties", "base": "world",
         "models": [{"model": "world-sft-arithmetic"}, {"model": "world-sft-reversal"}]},
        {"name": "avg", "kind": "merge", "method": "linear",
         "models": [{"model": "world-sft-arithmetic"}, {"model": "world"}]},
    ]
    cfg = load_pipeline(None, data={"name": "refs", "eval": {"limit": 4}, "stages": stages})
    run_dir = tmp_path / "r"
    run_pipeline(cfg, run_dir, lambda m: None)
    report = json.loads((run_dir / "report" / "forgetting.json").read_text())
    rows = report["stages"]
    names = ["base", "input:world-sft-arithmetic", "input:world-sft-reversal", "m", "avg"]
    assert [r["name"] for r in rows] == names
    assert [bool(r.get("reference")) for r in rows] == [False, True, True, False, False]
    for row, folder in zip(rows[1:3], ["world-sft-arithmetic", "world-sft-reversal"]):
        measured = json.loads((run_dir / "inputs" / folder / "eval.json").read_text())
        assert row["scores"] == measured["scores"] and row["input_of"] == "m"
        assert row["model"] == measured["model"]
    # The arithmetic specialist is what SFT made it; its delta vs base is in the report, its forgetting is not.
    key = "world_arithmetic/exact_match"
    assert report["tasks"][key]["delta_vs_base"][1] == rows[1]["scores"][key]["value"] - rows[0]["scores"][key]["value"]
    assert report["tasks"][key]["forgetting"][1] is None
    md = (run_dir / "report" / "forgetting.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| input:world-sft-reversal "))
    assert f"{rows[2]['scores']['world_reversal/exact_match']['value']:.3f}" in line and "input of m" in line

    logs: list[str] = []
    run_pipeline(cfg, run_dir, logs.append)
    assert sum("eval: reusing" in x and "/inputs/" in x for x in logs) == 2
    again = json.loads((run_dir / "report" / "forgetting.json").read_text())
    assert [r["name"] for r in again["stages"]] == [r["name"] for r in rows]


# Fake scores by model (a substring of its folder), so that the pipeline's records, lineage, eval.json files
# and report are real while no model is evaluated. Keys: arithmetic, reversal.
FAKE_SCORES = {"01_left": (0.75, 0.25), "02_left2": (0.5, 0.75), "03_right": (0.25, 0.625),
               "world-sft-arithmetic": (0.875, 0.25), "world-sft-reversal": (0.25, 0.875), "/base": (0.25, 0.25)}


def _fake_lm_eval(model_dir, spec, include, limit, settings, log):
    values = next(v for k, v in FAKE_SCORES.items() if k in str(model_dir))
    scores = {f"world_{t}/exact_match": {"value": v, "stderr": 0.0} for t, v in zip(["arithmetic", "reversal"], values)}
    return {"scores": scores, "seconds": 0.0, "backend": "fake", "lm_eval": {}, "task_configs": {}}


def test_branched_pipeline_records_lineage_and_report_rerenders_the_same(world, tmp_path, monkeypatch):
    """Two branches from the base (left -> left2, and right): right is measured against the base only, not
    against its sibling left; `posttrain report` rebuilds the same forgetting.json, reference rows included."""
    import evals.runner
    from evals.run_report import rerender_report

    monkeypatch.setattr(evals.runner, "_run_lm_eval", _fake_lm_eval)
    stages = [
        {"name": "left", "kind": "merge", "method": "linear", "model": "world",
         "models": [{"model": "world"}, {"model": "world-sft-arithmetic"}]},
        {"name": "left2", "kind": "merge", "method": "linear",
         "models": [{"model": "${stages.left.model}"}, {"model": "world-sft-reversal"}]},
        {"name": "right", "kind": "merge", "method": "linear", "model": "world",
         "models": [{"model": "world"}, {"model": "world-sft-reversal"}]},
    ]
    cfg = load_pipeline(None, data={"name": "branches", "eval": {"limit": 4}, "stages": stages})
    run_dir = tmp_path / "r"
    run_pipeline(cfg, run_dir, lambda m: None)
    written = json.loads((run_dir / "report" / "forgetting.json").read_text())
    rows = written["stages"]
    assert [r["name"] for r in rows] == ["base", "input:world-sft-arithmetic", "left", "input:world-sft-reversal",
                                        "left2", "right"]
    assert [r.get("parents") for r in rows] == [[], None, ["base"], None, ["left"], ["base"]]
    for folder, parents in [("01_left", ["base"]), ("02_left2", ["left"]), ("03_right", ["base"])]:
        assert json.loads((run_dir / "stages" / folder / "eval.json").read_text())["parents"] == parents
    # right vs its ancestors (the base: 0.25, 0.25), not vs left (0.75 arithmetic) or left2 (0.75 reversal).
    arith, rev = written["tasks"]["world_arithmetic/exact_match"], written["tasks"]["world_reversal/exact_match"]
    assert arith["forgetting"][-1] == 0.0 and rev["forgetting"][-1] == -0.375
    assert arith["delta_vs_previous"][-1] == 0.0 and rev["delta_vs_previous"][-1] == 0.375
    # left2 vs left: arithmetic 0.75 -> 0.5; its forgetting is over base and left.
    assert arith["forgetting"][4] == 0.25 and rev["forgetting"][4] == -0.5
    assert [b["stage"] for b in written["summary"]["branches"]] == ["left2", "right"]
    md = (run_dir / "report" / "forgetting.md").read_text()
    right_row = next(x for x in md.splitlines() if x.startswith("| right "))
    assert "| from" in md and right_row.split("|")[2].strip() == "base"

    (run_dir / "report" / "forgetting.json").unlink()
    rerender_report(run_dir)
    assert json.loads((run_dir / "report" / "forgetting.json").read_text()) == written
    assert (run_dir / "report" / "forgetting.md").read_text() == md


@pytest.mark.parametrize("config, parents", [
    ("recycle_then_finetune", {"transfer": ["base"], "sft_recycled": ["transfer"], "sft_from_v2": ["base"]}),
    ("hft_vs_full", {"full_arithmetic": ["base"], "full_reversal": ["full_arithmetic"],
                     "hft_arithmetic": ["base"], "hft_reversal": ["hft_arithmetic"]}),
    ("merge_specialists", {"sft_arithmetic": ["base"], "sft_reversal": ["base"],
                           "merge": ["base", "sft_arithmetic", "sft_reversal"]}),  # its `base:` first, not the
    # previous stage, which it does not read
])
def test_branched_configs_parents(world, tmp_path, config, parents):
    """The lineage the pipeline records for the shipped branched pipelines: sft_from_v2 starts from world-v2,
    the base, so it descends from the base and not from sft_recycled before it."""
    from posttrain.models import resolve_model
    from posttrain.pipeline import Pipeline

    cfg = load_pipeline(Path(__file__).resolve().parent.parent / "configs" / "pipelines" / f"{config}.yaml")
    pipe = Pipeline(cfg, tmp_path / "r", lambda m: None)
    got = {}
    for i, stage in enumerate(cfg.stages):
        plain = stage.model and "${" not in stage.model
        got[stage.name] = pipe._parents(i, stage, resolve_model(stage.model, lambda m: None) if plain else "")
    assert got == parents


def test_first_stage_merge_with_base_is_measured_against_that_base_and_never_builds_the_world(merge_trio, tmp_path,
                                                                                              monkeypatch):
    """A merge with `base:` as the first stage: the report's base row is that base (not the world model the
    merge never reads), the merge descends from it, and the world is never resolved."""
    import evals.runner
    import posttrain.pipeline

    base, a, _ = merge_trio
    evaluated, resolved = [], []
    monkeypatch.setattr(evals.runner, "_run_lm_eval", lambda model_dir, *a, **k: evaluated.append(str(model_dir))
                        or {"scores": {"world_arithmetic/exact_match": {"value": 0.5, "stderr": 0.0}},
                            "seconds": 0.0, "backend": "fake", "lm_eval": {}, "task_configs": {}})
    real = posttrain.pipeline.resolve_model
    monkeypatch.setattr(posttrain.pipeline, "resolve_model", lambda ref, log=print: resolved.append(ref) or real(ref, log))
    stage = {"name": "m", "kind": "merge", "method": "task_arithmetic", "base": str(base),
             "models": [{"model": str(a), "weight": 0.5}]}
    logs = []
    run_pipeline(load_pipeline(None, data={"eval": {"limit": 2}, "stages": [stage]}), tmp_path / "r", logs.append)
    assert evaluated[0] == str(base) and "world" not in resolved
    rows = json.loads((tmp_path / "r" / "report" / "forgetting.json").read_text())["stages"]
    assert rows[0]["name"] == "base" and rows[-1]["name"] == "m" and rows[-1]["parents"] == ["base"]
    assert any(f"merge from {base}" in line for line in logs)


def test_first_stage_linear_merge_is_compared_with_the_pipeline_base_not_its_first_model(merge_trio, tmp_path,
                                                                                        monkeypatch):
    """A linear merge has no base: the report's base row is the first stage's `model:` (the world by default),
    as claims 4a/4b compare merges with it, not the first model averaged."""
    import evals.runner

    base, a, b = merge_trio
    evaluated = []
    monkeypatch.setattr(evals.runner, "_run_lm_eval", lambda model_dir, *x, **k: evaluated.append(str(model_dir))
                        or {"scores": {"world_arithmetic/exact_match": {"value": 0.5, "stderr": 0.0}},
                            "seconds": 0.0, "backend": "fake", "lm_eval": {}, "task_configs": {}})
    stage = {"name": "avg", "kind": "merge", "method": "linear", "model": str(base),
             "models": [{"model": str(a)}, {"model": str(b)}]}
    run_pipeline(load_pipeline(None, data={"eval": {"limit": 2}, "stages": [stage]}), tmp_path / "r", lambda m: None)
    assert evaluated[0] == str(base)
    rows = json.loads((tmp_path / "r" / "report" / "forgetting.json").read_text())["stages"]
    assert [r["name"] for r in rows] == ["base", f"input:{a}", f"input:{b}", "avg"]
