"""Run directory: atomic writes, the lock within one process, DONE markers and their hashes (a second process on
the run dir: tests/reliability/test_lock.py)."""
import json

import pytest

from posttrain.rundir import RunDir, RunDirLocked, atomic_write_json


def test_atomic_write_leaves_no_temp(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_lock_in_same_process_twice_raises(tmp_path):
    a, b = RunDir(tmp_path), RunDir(tmp_path)
    a.lock()
    with pytest.raises(RunDirLocked):
        b.lock()
    a.unlock()


def _finished_stage(tmp_path):
    final = tmp_path / "stages" / "01_x"
    (final / "model").mkdir(parents=True)
    (final / "model" / "w.safetensors").write_bytes(b"abc")
    done = RunDir.write_done(final, "c1", "i1")
    return final, done


def test_done_matches_then_detects_tampering(tmp_path):
    final, done = _finished_stage(tmp_path)
    assert RunDir.check_done(final, "c1", "i1")[0] == done
    assert RunDir.check_done(final, "c2", "i1") == (None, "config changed")
    assert RunDir.check_done(final, "c1", "i2") == (None, "inputs changed")
    (final / "model" / "w.safetensors").write_bytes(b"abd")
    rec, why = RunDir.check_done(final, "c1", "i1")
    assert rec is None and "w.safetensors" in why


def test_finalize_replaces_unfinished_folder(tmp_path):
    rd = RunDir(tmp_path)
    work, final = rd.work_dir(1, "x"), rd.stage_dir(1, "x")
    (final / "model").mkdir(parents=True)
    (final / "stale").write_text("old")
    (work / "model").mkdir(parents=True)
    (work / "new").write_text("new")
    rd.finalize(work, final)
    assert (final / "new").read_text() == "new" and not (final / "stale").exists() and not work.exists()
