"""Faults: a crash between rename and DONE, a NaN loss, a full disk while saving, a second process."""
import errno
import json

import pytest

import posttrain.stages  # noqa: F401
from posttrain.config import load_pipeline
from posttrain.pipeline import run_pipeline

TINY = {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2}


def _cfg(**trainer):
    return load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
        {"name": "a", "kind": "sft", "data": [{"source": "arithmetic", "limit": 16}], "trainer": {**TINY, **trainer}}]})


def test_folder_without_done_is_rerun(world, tmp_path):
    """A kill after the rename but before DONE leaves a folder that is not done: the rerun replaces it."""
    run_dir = tmp_path / "r"
    run_pipeline(_cfg(), run_dir, lambda m: None)
    final = run_dir / "stages" / "01_a"
    (final / "DONE").unlink()
    (final / "model" / "model.safetensors").write_bytes(b"half-written")
    logs = []
    run_pipeline(_cfg(), run_dir, logs.append)
    assert any("rerunning: not done" in m for m in logs)
    assert (final / "DONE").is_file() and (final / "model" / "model.safetensors").stat().st_size > 1000


def test_nan_loss_stops_without_done(world, tmp_path, cli):
    run_dir = tmp_path / "r"
    r = cli("stage", "sft", "--run-dir", str(run_dir), "--set", "eval.enabled=false",
            "--set", "data=[{source: arithmetic, limit: 16}]", "--set", "trainer.per_device_train_batch_size=4",
            "--set", "trainer.max_steps=6", "--set", "trainer.logging_steps=1", "--set", "trainer.save_steps=1",
            "--set", "trainer.max_grad_norm=1e30", "--set", "trainer.learning_rate=1e30")
    assert r.returncode == 1
    errors = [line[line.index("error:"):] for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "loss became" in errors[0] and "checkpoint" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (run_dir / "stages" / "01_sft").exists()
    assert (run_dir / "stages" / ".01_sft.tmp" / "checkpoints").is_dir()


def test_disk_full_while_saving_keeps_previous_checkpoint(world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def full_disk(self, save_directory, *a, **k):
        if str(save_directory).endswith("/model"):  # the final save; checkpoints still work
            raise OSError(errno.ENOSPC, "No space left on device", str(save_directory))
        return real(self, save_directory, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    run_dir = tmp_path / "r"
    with pytest.raises(OSError, match="No space left"):
        run_pipeline(_cfg(), run_dir, lambda m: None)
    work = run_dir / "stages" / ".01_a.tmp"
    ckpts = sorted((work / "checkpoints").glob("checkpoint-*"))
    assert ckpts and not (run_dir / "stages" / "01_a" / "DONE").exists()
    AutoModelForCausalLM.from_pretrained(ckpts[-1])  # the last checkpoint stays loadable
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    logs = []
    run_pipeline(_cfg(), run_dir, logs.append)  # the rerun finishes from the checkpoint
    assert any("resuming from" in m for m in logs)
    assert json.loads((run_dir / "stages" / "01_a" / "DONE").read_text())["model_files"]
