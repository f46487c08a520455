"""Pipeline runner: stage references (tiny training runs). Reruns, tampering and the run-dir layout are tested in
tests/reliability/test_rerun.py."""
import json

import pytest

import posttrain.stages  # noqa: F401
from posttrain.config import load_pipeline
from posttrain.pipeline import PipelineError, run_pipeline

TINY = {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2}


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
    stages[2]["model"] = "${stages.zz.model}"
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": stages})
    with pytest.raises(PipelineError, match="names no earlier stage"):
        run_pipeline(cfg, tmp_path / "r", lambda m: None)


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
