"""kill -9 during training, then the same command: resumes from the last checkpoint, bit-identical result."""
import hashlib

import pytest

ARGS = ["stage", "sft", "--set", "eval.enabled=false", "--set", "data=[{source: arithmetic, limit: 32}]",
        "--set", "trainer.per_device_train_batch_size=4", "--set", "trainer.save_steps=4",
        "--set", "trainer.logging_steps=1"]


def _weights(run_dir):
    return hashlib.sha256((run_dir / "stages" / "01_sft" / "model" / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    from tests.conftest import run_cli

    out = {}
    for accum in (1, 2):
        run_dir = tmp_path_factory.mktemp("ref") / "run"
        r = run_cli(*ARGS, "--set", "trainer.max_steps=12", "--set", f"trainer.gradient_accumulation_steps={accum}",
                    "--run-dir", str(run_dir))
        assert r.returncode == 0, r.stderr[-2000:]
        out[accum] = _weights(run_dir)
    return out


@pytest.mark.parametrize("kill_at, accum", [(6, 1), (8, 1), (5, 2)], ids=["mid-epoch", "epoch-boundary", "grad-accum"])
def test_kill_then_rerun_resumes_bit_identical(uninterrupted, tmp_path, kill_at, accum):
    """32 rows / batch 4 = 8 steps an epoch: step 8 is an epoch boundary; with accumulation 2 an epoch is 4 steps."""
    from tests.conftest import run_cli

    run_dir = tmp_path / "run"
    cmd = [*ARGS, "--set", "trainer.max_steps=12", "--set", f"trainer.gradient_accumulation_steps={accum}",
           "--run-dir", str(run_dir)]
    r = run_cli(*cmd, env={"POSTTRAIN_FAULT_KILL_AT_STEP": str(kill_at),
                           "POSTTRAIN_FAULT_MID_ACCUMULATION": "1" if accum > 1 else "0"})
    assert r.returncode == -9
    work = run_dir / "stages" / ".01_sft.tmp"
    assert (work / "checkpoints").is_dir() and not (run_dir / "stages" / "01_sft").exists()
    r = run_cli(*cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr
    assert _weights(run_dir) == uninterrupted[accum]
    assert not work.exists()
