"""Item 2: `kill -9` while a stage writes its model. The run dir then holds the old state or the new one, never a
half-written folder marked done, and the same command again finishes the stage.

The kills are real SIGKILLs at chosen points of the save (tests/reliability/faults.py): halfway through the
weights file, between the rename into place and DONE, and between moving an older folder aside and renaming
the new one in.
"""
import json
import shutil

from posttrain.rundir import RunDir
from tests.conftest import run_cli
from tests.reliability.conftest import run_with_fault, sft_args, weights_sha


def assert_nothing_half_done(run_dir):
    """Every stage folder with a DONE holds exactly the model files DONE hashed: complete, never half."""
    for folder in (run_dir / "stages").iterdir():
        if (folder / "DONE").is_file():
            done = json.loads((folder / "DONE").read_text())
            record, why = RunDir.check_done(folder, done["config_sha256"], done["inputs_sha256"])
            assert record is not None, f"{folder} is marked done but {why}"
            assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(done["model_files"])


def test_kill_while_saving_then_rerun_finishes(uninterrupted, tmp_path):
    """Killed halfway through the weights file; the rerun resumes, saves, renames and is killed before DONE;
    the third run finishes the stage with the weights an uninterrupted run has."""
    run_dir = tmp_path / "run"
    final = run_dir / "stages" / "01_sft"
    r = run_with_fault("kill-in-model-weights", *sft_args(run_dir))
    assert r.returncode == -9, r.stderr[-2000:]
    half = run_dir / "stages" / ".01_sft.tmp" / "model" / "model.safetensors"
    assert 0 < half.stat().st_size < 4_000_000 and not final.exists()  # the half file is in the work folder
    assert_nothing_half_done(run_dir)

    r = run_with_fault("kill-before-done", *sft_args(run_dir))
    assert r.returncode == -9, r.stderr[-2000:]
    assert "resuming from" in r.stderr
    assert (final / "model" / "model.safetensors").is_file() and not (final / "DONE").exists()
    assert_nothing_half_done(run_dir)

    r = run_cli(*sft_args(run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rerunning: not done" in r.stderr
    assert weights_sha(run_dir) == weights_sha(uninterrupted[1])
    assert_nothing_half_done(run_dir)
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["01_sft"]


def test_kill_while_replacing_a_finished_stage_keeps_old_or_new(uninterrupted, tmp_path):
    """A stage that reruns over an older finished folder (its config changed) and is killed while saving."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[1], run_dir)
    final = run_dir / "stages" / "01_sft"
    old_done = json.loads((final / "DONE").read_text())
    changed = [*sft_args(run_dir), "--set", "trainer.learning_rate=3e-4"]

    r = run_with_fault("kill-in-model-weights", *changed)
    assert r.returncode == -9, r.stderr[-2000:]
    assert json.loads((final / "DONE").read_text()) == old_done  # the old state, whole
    assert_nothing_half_done(run_dir)

    r = run_with_fault("kill-in-replace", *changed)  # resumes, saves, moves the old folder aside, dies
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (final / "DONE").exists()
    assert_nothing_half_done(run_dir)

    r = run_cli(*changed)
    assert r.returncode == 0, r.stderr[-2000:]
    new_done = json.loads((final / "DONE").read_text())
    assert new_done["config_sha256"] != old_done["config_sha256"]
    assert "learning_rate: 0.0003" in (final / "config.yaml").read_text()
    assert_nothing_half_done(run_dir)
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["01_sft"]  # no leftover folder
