"""Issue 18, fail fast: bad data and bad model files are refused before the base eval and before the run dir
exists (exit 2, one line naming the file), not after a base eval that leaves a half-made run dir behind.

Every data source is read through the stage's own loader (data.check_source) and every input model folder that
exists is checked (model_check: headers, sizes against the header, the index's shards, a NaN/Inf scan) before
the CLI makes the run dir. The CLI cases run with evals on and `evaluate_into_run` replaced by a function that
fails the test, so "before the base eval" is checked, not assumed.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import evals.run_report
from posttrain.data import DataError, DataSource, check_source, load_rows
from posttrain.model_check import check_model, scan_cache_clear
from posttrain.models import ModelError
from tests.reliability.conftest import cli_here, error_lines

ROW = {"prompt": "1 + 2 =", "completion": " 3"}


@pytest.fixture
def no_eval(monkeypatch):
    def evaluate_into_run(pipe, stage, folder, model_dir):
        raise AssertionError(f"{folder}: the eval ran before the bad input was refused")

    monkeypatch.setattr(evals.run_report, "evaluate_into_run", evaluate_into_run)


def _stage(capsys, run_dir, *sets: str) -> tuple[int, list[str]]:
    """`posttrain stage sft` with evals on (limit 1) and `sets`: (exit code, its `error:` lines)."""
    args = ["stage", "sft", "--run-dir", str(run_dir), "--set", "eval.limit=1", "--set", "trainer.max_steps=1"]
    for s in sets:
        args += ["--set", s]
    code, err = cli_here(capsys, *args)
    return code, error_lines(err)


def _copy_base(world, dst):
    shutil.copytree(world / "base", dst)
    return dst


@pytest.mark.parametrize("case", ["truncated-json", "empty-file"])
def test_bad_data_exits_2_before_the_base_eval_and_the_run_dir(case, world, tmp_path, capsys, no_eval):
    data = tmp_path / "d.jsonl"
    good = json.dumps(ROW)
    data.write_text(f"{good}\n{good}\n{good[: len(good) // 2]}\n" if case == "truncated-json" else "")
    code, lines = _stage(capsys, tmp_path / "run", f"data=[{{source: '{data}'}}]")
    assert code == 2 and len(lines) == 1, lines
    assert str(data) in lines[0]
    assert ("row 3: bad JSON" if case == "truncated-json" else "no usable rows") in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["truncated-weights", "truncated-header", "nan-weights", "inf-weights"])
def test_bad_model_files_exit_2_naming_the_file_before_the_base_eval(case, world, tmp_path, capsys, no_eval):
    model = _copy_base(world, tmp_path / "model")
    weights = model / "model.safetensors"
    if case.startswith("truncated"):
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if case == "truncated-weights" else data[:100])
        expected = "truncated"
    else:
        tensors = load_file(weights)
        tensors["model.norm.weight"][3] = float("nan") if case == "nan-weights" else float("inf")
        save_file(tensors, weights, metadata={"format": "pt"})
        expected = "tensor 'model.norm.weight' holds 1 NaN or infinite values"
    code, lines = _stage(capsys, tmp_path / "run", f"model={model}", "data=[{source: arithmetic, limit: 4}]")
    assert code == 2 and len(lines) == 1, lines
    assert f"model file {weights}" in lines[0] and expected in lines[0], lines[0]
    assert "rerun with" not in lines[0] and not (tmp_path / "run").exists()


def test_sharded_model_missing_a_shard_or_with_bad_json_is_named(tmp_path):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path / "m", shard="8KB")
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(ModelError, match=f"model.safetensors.index.json: .*lists {shards[1].name}, which is missing"):
        check_model(str(model), log=lambda m: None)
    (model / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelError, match=f"model file {model / 'config.json'}: not valid JSON"):
        check_model(str(model), log=lambda m: None)


def test_a_file_is_scanned_once_while_unchanged(tmp_path):
    from tests.conftest import make_tiny_llama

    scan_cache_clear()
    model = make_tiny_llama(tmp_path / "m")
    logs: list[str] = []
    check_model(str(model), log=logs.append)
    check_model(str(model), log=logs.append)
    assert len(logs) == 1 and "values all finite" in logs[0] and str(model) in logs[0]
    tensors = load_file(model / "model.safetensors")
    tensors["lm_head.weight"][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})  # a new file: read again
    with pytest.raises(ModelError, match="'lm_head.weight' holds 1 NaN"):
        check_model(str(model), log=logs.append)


def test_a_row_over_max_row_bytes_is_a_bad_row(tmp_path):
    data = tmp_path / "d.jsonl"
    big = {"prompt": "x" * 1_500_000, "completion": " y"}
    data.write_text("".join(json.dumps(r) + "\n" for r in (ROW, big, ROW)))
    with pytest.raises(DataError, match=r"d.jsonl row 2: 1,500,002 bytes of text, over max_row_bytes \(1,000,000"):
        check_source(DataSource(source=str(data)), "sft", log=lambda m: None)
    rows, stats = load_rows(DataSource(source=str(data), on_bad_rows="skip"), "sft", log=lambda m: None)
    assert len(rows) == 2 and stats["bad_rows"] == 1
    rows, _ = load_rows(DataSource(source=str(data), max_row_bytes=2_000_000), "sft", log=lambda m: None)
    assert len(rows) == 3
    assert "max_row_bytes" not in DataSource(source="x").model_dump()  # at its default: config hashes unchanged
    assert DataSource(source="x", max_row_bytes=5).model_dump()["max_row_bytes"] == 5


def test_rows_far_longer_than_max_length_are_counted_in_a_warning(tmp_path):
    data = tmp_path / "d.jsonl"
    long = {"prompt": "q", "completion": "z" * 5000}
    data.write_text("".join(json.dumps(r) + "\n" for r in (ROW, long, ROW, long, long)))
    logs: list[str] = []
    stats = check_source(DataSource(source=str(data)), "sft", logs.append, max_length=256)
    assert stats["rows"] == 5
    [warning] = [m for m in logs if "warning" in m]
    assert "3 rows of" in warning and "trainer.max_length (256 tokens)" in warning and "first: row 2" in warning
    logs.clear()
    check_source(DataSource(source=str(data)), "sft", logs.append, max_length=1024)  # 5000 B: not far over 1024
    assert not [m for m in logs if "warning" in m]


def test_a_world_model_not_built_yet_is_left_for_its_stage(monkeypatch, tmp_path):
    """Checks before a run never build a world model (minutes): an unbuilt one is checked when it exists."""
    import posttrain.world as world
    from posttrain.model_check import existing_model
    from posttrain.registry import WORLD_MODELS

    built = []

    def factory(log=print):
        world.refuse_build("test-unbuilt")
        built.append(True)
        return tmp_path

    monkeypatch.setitem(WORLD_MODELS._items, "test-unbuilt", factory)
    assert existing_model("test-unbuilt") is None and not built
    assert existing_model("${stages.a.model}") is None
    with pytest.raises(ModelError, match="has no config.json"):
        existing_model(str(tmp_path))


def _nan_copy(src, dst):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["lm_head.weight"][1, 1] = float("nan")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_model_that_exists_only_later_is_checked_when_its_stage_starts(merge_trio, tmp_path, monkeypatch):
    """A model not there before the run (a world model built on first use, say) is checked at its stage's
    start, before the stage runs: here the up-front check is told the input does not exist yet."""
    import posttrain.pipeline
    from posttrain.config import load_pipeline
    from posttrain.pipeline import run_pipeline

    base, a, _ = merge_trio
    bad = _nan_copy(a, tmp_path / "bad")
    monkeypatch.setattr(posttrain.pipeline, "existing_model", lambda ref: None)
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
        {"name": "m", "kind": "merge", "method": "task_arithmetic", "base": str(base), "models": [{"model": str(bad)}]}]})
    with pytest.raises(ModelError, match=f"model file {bad / 'model.safetensors'}: tensor 'lm_head.weight' holds 1"):
        run_pipeline(cfg, tmp_path / "run", lambda m: None)
    assert not (tmp_path / "run" / "stages").exists()


def test_stages_done_with_this_config_are_not_read_again(tmp_path):
    """A rerun of a finished pipeline reads none of its inputs: their check is skipped too, and only for the
    first stages whose DONE records the config as it is now."""
    import posttrain.stages  # noqa: F401
    from posttrain.config import load_pipeline
    from posttrain.pipeline import check_inputs, stage_config_hash
    from posttrain.rundir import RunDir

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
        {"name": "a", "kind": "sft", "data": [{"source": str(data)}]},
        {"name": "b", "kind": "sft", "data": [{"source": str(data), "limit": 1}]}]})
    run = tmp_path / "run"
    (run / "stages" / "01_a" / "model").mkdir(parents=True)
    RunDir.write_done(run / "stages" / "01_a", stage_config_hash(cfg.stages[0]), "inputs")
    logs: list[str] = []
    data.write_text("{not json\n")  # what a done stage read once: not read again
    with pytest.raises(DataError, match="row 1: bad JSON"):  # stage b is not done: its data is read
        check_inputs(cfg, logs.append, run)
    assert logs == ["inputs: not read for a, finished with this config (read if it reruns)"]
    with pytest.raises(DataError, match="row 1: bad JSON"):  # another config of a: read
        check_inputs(load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
            {"name": "a", "kind": "sft", "data": [{"source": str(data)}], "trainer": {"max_steps": 3}}]}),
            lambda m: None, run)


@pytest.mark.parametrize("main", [True, False])
def test_under_a_launcher_the_main_checks_and_every_rank_stops_on_bad_input(main, monkeypatch):
    """The inputs are read by the main process alone; its verdict reaches every rank (agree), so the others
    exit 2 with it instead of waiting at a barrier for a process that has gone."""
    import posttrain.distributed as dist

    calls = []

    def check():
        calls.append("checked")
        raise ModelError("model file x: truncated")

    monkeypatch.setattr(dist, "launched", lambda: True)
    monkeypatch.setattr(dist, "is_main", lambda: main)
    monkeypatch.setattr(dist, "agree", lambda value: "model file x: truncated")  # the main's verdict
    with pytest.raises(ModelError if main else SystemExit) as e:
        dist.main_decides(check, (ModelError,))
    assert calls == (["checked"] if main else [])
    assert main or e.value.code == 2
    monkeypatch.setattr(dist, "agree", lambda value: None)
    dist.main_decides(lambda: None, (ModelError,))  # no problem anywhere: every rank goes on
