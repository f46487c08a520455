"""benchmarks/: the raw sides compare like with like, figures say when they are off goal, the README table is
replaced in place. The timings themselves are `make bench`'s business, not a test's."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import merge_worker, run
from benchmarks.common import Figure, paired, ratio_figure, unavailable
from benchmarks.merge_data import QUICK, write_models


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_plain_trl_script_gets_the_same_trl_config_as_the_stage(kind, tmp_path):
    from benchmarks.train import args_differences, plain_args, stage_yaml

    stage = stage_yaml(kind, str(tmp_path / "model"), steps=7)
    assert args_differences(kind, stage, plain_args(kind, 7), tmp_path) == []
    changed = {**plain_args(kind, 7), "learning_rate": 1.0}
    assert args_differences(kind, stage, changed, tmp_path) == ["learning_rate"]


def test_figure_status_never_hides_an_off_goal_number():
    assert ratio_figure("x", [1.2, 1.1, 9.0], [1.0, 1.0, 1.0], 1.05).finish().status == "OFF GOAL"
    ok = ratio_figure("x", [2.0, 3.0, 1.0], [2.0, 3.0, 1.0], 1.05).finish()
    assert ok.status == "ok" and ok.value == 1.0 and ok.to_json()["met"] is True
    gone = unavailable("mergekit", "pip failed").finish()
    assert gone.status == "unavailable" and gone.value is None and gone.to_json()["met"] is False
    assert Figure("info", 3.0, None).finish().status == "info"


def test_ratio_is_the_median_of_pairs_and_pairs_alternate_order():
    calls: list[str] = []
    a, b = paired(lambda: calls.append("a") or 2.0, lambda: calls.append("b") or 1.0, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"] and a == [2.0] * 3 and b == [1.0] * 3
    assert ratio_figure("x", [3.0, 1.0, 2.0], [1.0, 1.0, 1.0], 1.0).value == 2.0


def test_readme_table_replaced_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# t\n## Benchmarks\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n## Scale\nkeep\n")
    table = run.table([Figure("merge", 4.0, 1.5).finish(), unavailable("mk", "no pip").finish()])
    assert run.update_readme(table, readme)
    text = readme.read_text()
    assert "old" not in text and "| merge | 4.00 | 1.5 | OFF GOAL |  |" in text and "| mk | - | - | unavailable |  |" in text
    assert text.startswith("# t\n## Benchmarks\n") and text.endswith("<!-- bench:end -->\n## Scale\nkeep\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not run.update_readme(table, plain) and plain.read_text() == "no markers\n"


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_merge_worker_raw_and_stage_sides(tmp_path, capsys):
    base, ft1, ft2 = write_models(tmp_path / "in", QUICK)
    assert len(list(base.glob("model-*.safetensors"))) > 1  # sharded, as the figure needs
    inputs = [str(base), str(ft1), str(ft2)]
    merge_worker.main(["raw", str(tmp_path / "raw"), str(QUICK.shard_bytes), *inputs])
    raw_report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    merge_worker.main(["task_arithmetic", str(tmp_path / "ta"), str(QUICK.shard_bytes), *inputs])
    ta_report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for report in (raw_report, ta_report):
        assert report["seconds"] > 0 and report["peak_rss_mb"] >= report["rss_after_imports_mb"] > 0
    names = set(QUICK.tensors())
    assert set(_tensors(tmp_path / "raw")) == names
    b, m1, m2, merged = _tensors(base), _tensors(ft1), _tensors(ft2), _tensors(tmp_path / "ta" / "model")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(merged[name], b[name] + (m1[name] - b[name]) + (m2[name] - b[name]), atol=1e-6)
