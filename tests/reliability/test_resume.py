"""Item 1: `kill -9` during training, then the same command: it resumes from the last checkpoint and the final
weights are bit-identical to an uninterrupted run, also when the kill lands at an epoch boundary or halfway
through a gradient accumulation (data order and RNG states are restored from the checkpoint)."""
import json

import pytest

from tests.conftest import run_cli
from tests.reliability.conftest import sft_args, weights_sha


@pytest.mark.parametrize("kill_at, accum", [(6, 1), (8, 1), (5, 2)], ids=["mid-epoch", "epoch-boundary", "grad-accum"])
def test_kill_then_rerun_resumes_bit_identical(uninterrupted, tmp_path, kill_at, accum):
    """32 rows / batch 4 = 8 steps an epoch: step 8 is an epoch boundary; with accumulation 2 an epoch is 4 steps.

    The kill comes from the stage's own fault hook (POSTTRAIN_FAULT_KILL_AT_STEP, posttrain/stages/common.py),
    after optimizer step N, or with POSTTRAIN_FAULT_MID_ACCUMULATION=1 after a micro-batch of step N + 1.
    """
    run_dir = tmp_path / "run"
    cmd = sft_args(run_dir, accum)
    r = run_cli(*cmd, env={"POSTTRAIN_FAULT_KILL_AT_STEP": str(kill_at),
                           "POSTTRAIN_FAULT_MID_ACCUMULATION": "1" if accum > 1 else "0"})
    assert r.returncode == -9
    work = run_dir / "stages" / ".01_sft.tmp"
    assert (work / "checkpoints").is_dir() and not (run_dir / "stages" / "01_sft").exists()
    r = run_cli(*cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr
    assert weights_sha(run_dir) == weights_sha(uninterrupted[accum])
    assert not work.exists()
    # The steps logged after the checkpoint and before the kill are logged again: metrics.jsonl keeps them once.
    records = [json.loads(x) for x in (run_dir / "stages" / "01_sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12
    resumed = [r for r in records if r.get("event") == "resume"]
    assert len(resumed) == 1 and f"resuming from {resumed[0]['checkpoint']}" in r.stderr
