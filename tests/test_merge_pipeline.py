"""configs/pipelines/merge_specialists.yaml end to end: two specialists trained as stages, then merged.

Its own file so that `make test` (pytest-xdist, --dist loadfile) runs it beside the merge stage's other
slow test (tests/test_merge_stage.py trains or reuses the cached world specialists).
"""
import json
from pathlib import Path

import pytest


@pytest.mark.slow  # two 800-step SFTs (the SFT defaults) and four evals: about 2 minutes
def test_merge_specialists_pipeline_runs_to_a_report(world, tmp_path):
    """configs/pipelines/merge_specialists.yaml: both specialists learn their task, the merge follows them, and
    the report has one row each; the specialists are stages here, so no reference row repeats them."""
    from posttrain.config import load_pipeline
    from posttrain.pipeline import run_pipeline

    path = Path(__file__).parent.parent / "configs" / "pipelines" / "merge_specialists.yaml"
    run_dir = run_pipeline(load_pipeline(path, ["eval.limit=20"]), tmp_path / "run", lambda m: None)
    report = json.loads((run_dir / "report" / "forgetting.json").read_text())
    rows = {r["name"]: r for r in report["stages"]}
    assert list(rows) == ["base", "sft_arithmetic", "sft_reversal", "merge"]
    assert not any(r.get("reference") for r in rows.values())

    def score(row: str, task: str) -> float:
        return rows[row]["scores"][f"world_{task}/exact_match"]["value"]

    assert score("sft_arithmetic", "arithmetic") >= score("base", "arithmetic") + 0.3
    assert score("sft_reversal", "reversal") >= score("base", "reversal") + 0.3
    merged = json.loads((run_dir / "stages" / "03_merge" / "merge.json").read_text())
    assert [m["folder"] for m in merged["inputs"]] == [str(run_dir / "stages" / f"0{i}_{n}" / "model")
                                                       for i, n in ((1, "sft_arithmetic"), (2, "sft_reversal"))]
    assert (run_dir / "report" / "forgetting.md").read_text().count("| merge ") == 3  # per stage, scores, forgetting per stage
