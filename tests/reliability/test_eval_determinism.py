"""Item 13: evaluation is deterministic. The same model and suite evaluated twice, here once in this process and
once by `posttrain eval` in a fresh process, give identical numbers; a third call with the same settings reuses
the saved result, which records the versions and hashes it was made with."""
import json

from evals.runner import evaluate_model
from posttrain.config import EvalConfig


def test_world_suite_twice_is_identical_and_reused(world, tmp_path, cli):
    a = evaluate_model(str(world / "base"), settings=EvalConfig(limit=20), out=tmp_path / "a.json", log=lambda m: None)
    assert len(a["scores"]) == 5
    r = cli("eval", str(world / "base"), "--suite", "world", "--limit", "20", "--out", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reusing" not in r.stderr
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["scores"] == a["scores"]  # exact: values and stderrs, every task
    logs = []
    c = evaluate_model(str(world / "base"), settings=EvalConfig(limit=20), out=tmp_path / "a.json", log=logs.append)
    assert c["scores"] == a["scores"] and any("reusing" in m for m in logs)
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["versions"]["lm_eval"] and saved["model_sha256"] and saved["task_hashes"]["world_arithmetic"]
