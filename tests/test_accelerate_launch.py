"""Data-parallel stages under `accelerate launch`: two CPU processes (gloo) train one SFT stage; only the main
process writes; a rerun skips on every rank. Plus the launcher's command line and the single-process view."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain import distributed as dist
from posttrain.cli import _strip_launcher_options
from posttrain.world.tuning import world_trainer

REPO = Path(__file__).resolve().parent.parent
ROWS, BATCH, STEPS = 256, 16, 24


def test_launcher_options_are_stripped_for_the_child():
    argv = ["stage", "sft", "--launcher", "accelerate", "--num-processes=2", "--set", "a.b=1",
            "--accelerate-config", "f.yaml", "--run-dir", "r"]
    assert _strip_launcher_options(argv) == ["stage", "sft", "--set", "a.b=1", "--run-dir", "r"]


def test_launch_command_is_accelerate_launch_of_the_module():
    ddp = dist.launch_command(["stage", "sft"], 2, str(REPO / "configs/accelerate/ddp_cpu.yaml"))
    assert ddp[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert ddp[-4:] == ["-m", "posttrain", "stage", "sft"]
    assert "--multi_gpu" in ddp and ddp[ddp.index("--num_processes") + 1] == "2"  # torchrun, even on CPU
    fsdp = dist.launch_command(["run", "p.yaml"], None, str(REPO / "configs/accelerate/fsdp.yaml"))
    assert "--multi_gpu" not in fsdp and "--num_processes" not in fsdp  # the config's own launcher and count
    with pytest.raises(FileNotFoundError):
        dist.launch_command(["stage", "sft"], 2, "missing.yaml")


def test_single_process_view_hides_the_launch_and_restores_it(monkeypatch):
    from accelerate.state import PartialState

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    PartialState._shared_state["sentinel"] = 1
    try:
        with dist.single_process_view():
            assert not dist.launched() and "ACCELERATE_USE_FSDP" not in os.environ
            assert "sentinel" not in PartialState._shared_state
        assert dist.launched() and os.environ["ACCELERATE_USE_FSDP"] == "true"
        assert PartialState._shared_state["sentinel"] == 1
    finally:
        PartialState._shared_state.pop("sentinel", None)


def test_follower_context_writes_no_metrics(tmp_path):
    ctx = dist.FollowerContext(run_dir=tmp_path, work_dir=tmp_path, index=1, seed=0, input_model=None,
                               resolve=str)
    ctx.log_metrics({"loss": 1.0})
    assert not ctx.metrics_path.exists()


def _launch(tmp_path: Path, run_dir: Path) -> subprocess.CompletedProcess:
    stage = {"kind": "sft", "model": "world", "data": [{"source": "arithmetic", "limit": ROWS}],
             "trainer": world_trainer("sft", learning_rate=2e-3, max_steps=STEPS, per_device_train_batch_size=BATCH,
                                      warmup_steps=2, logging_steps=4, save_steps=1000, max_length=64)}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(stage))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "posttrain", "stage", "sft", "--config", str(tmp_path / "sft.yaml"),
           "--set", "eval.enabled=false", "--run-dir", str(run_dir), "--launcher", "accelerate",
           "--num-processes", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_sft_with_two_processes_trains_once_and_writes_once(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    r = _launch(tmp_path, run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == str(run_dir) and lines.count(str(run_dir)) == 1  # one rank prints the run dir
    stage = run_dir / "stages" / "01_sft"
    result = json.loads((stage / "train_result.json").read_text())
    # Each optimizer step saw BATCH rows on each of 2 ranks: twice the epochs one process would cover.
    assert result["global_step"] == STEPS
    assert result["epoch"] == pytest.approx(STEPS * BATCH * 2 / ROWS, rel=0.02)
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in losses] == list(range(4, STEPS + 1, 4))  # logged once per step, not once per rank
    assert losses[-1][1] < losses[0][1]
    assert json.loads((stage / "DONE").read_text())["model_files"]
    assert not list(run_dir.glob("stages/.*"))  # no work folder left behind by either rank
    model = AutoModelForCausalLM.from_pretrained(stage / "model")
    assert model.num_parameters() > 0

    again = _launch(tmp_path, run_dir)  # every rank sees DONE and skips; nobody trains
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done already; skipping" in again.stderr and "train_runtime" not in again.stderr


@pytest.mark.slow
def test_pipeline_sft_then_merge_under_two_processes(tmp_path):
    """A stage that does not train (merge) runs on the main process only; the other rank waits and follows."""
    pipeline = {"name": "dp", "eval": {"enabled": False}, "stages": [
        {"name": "sft", "kind": "sft", "model": "world", "data": [{"source": "arithmetic", "limit": 64}],
         "trainer": world_trainer("sft", max_steps=4, per_device_train_batch_size=8, logging_steps=2, max_length=64)},
        {"name": "merged", "kind": "merge", "method": "task_arithmetic", "base": "world",
         "models": [{"model": "${stages.sft.model}", "weight": 0.5}]},
    ]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "posttrain", "run", str(tmp_path / "p.yaml"), "--run-dir", str(run_dir),
           "--launcher", "accelerate", "--num-processes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("[02 merged] merge from") == 1  # logged (and run) by one process
    merged = run_dir / "stages" / "02_merged"
    assert (merged / "DONE").is_file() and json.loads((merged / "merge.json").read_text())["models"] == 1
