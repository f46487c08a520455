"""GRPO with vLLM rollouts on a GPU: the colocated engine and a server this stage starts and stops, and a vLLM
eval after a colocated stage in the same process (it needs the trainer's and the engine's memory back).

Marked `gpu` (skipped without CUDA by tests/conftest.py) and skipped without vllm (`pip install -e .[gpu]`).
Two steps each from world-sft: the point is the plumbing (engine up, weights synced, completions scored,
server gone afterwards), not learning.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import posttrain.stages  # noqa: F401
from posttrain.config import load_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.world.tuning import world_trainer

pytestmark = pytest.mark.gpu


def _run(tmp_path, eval_block=None, **rollout):
    pytest.importorskip("vllm")
    stage = {
        "kind": "grpo", "model": "world-sft",
        "data": [{"source": "verifiable", "limit": 64}],
        "num_generations": 4, "max_completion_length": 8,
        "trainer": world_trainer("grpo", max_steps=2, per_device_train_batch_size=16, logging_steps=1,
                                 learning_rate=1e-4),
        "rollout": rollout,
    }
    cfg = load_pipeline(None, data={"eval": eval_block or {"enabled": False}, "stages": [stage]})
    run_pipeline(cfg, tmp_path / "r", print)
    out = tmp_path / "r" / "stages" / "01_grpo"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in records if r.get("event") == "data")["rollout"] == rollout["backend"]
    steps = [r for r in records if "rewards/numeric_match/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    from posttrain.models import resolve_model

    before = load_file(f"{resolve_model('world-sft')}/model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)
    return out


def test_grpo_vllm_colocate_two_steps(tmp_path):
    _run(tmp_path, backend="vllm_colocate", gpu_memory_utilization=0.3)


def test_vllm_eval_after_a_colocated_grpo_stage(tmp_path):
    """vLLM starts only with its share of the GPU free: before the release, the trainer and the colocated
    engine (0.3 of the GPU) still held theirs when the eval's engine asked for 0.9."""
    out = _run(tmp_path, {"backend": "vllm", "limit": 8}, backend="vllm_colocate", gpu_memory_utilization=0.3)
    record = json.loads((out / "eval.json").read_text())
    assert record["backend"] == "vllm" and record["scores"]
    assert json.loads((out.parent / "00_base" / "eval.json").read_text())["backend"] == "vllm"


def test_grpo_vllm_server_two_steps_and_server_stopped(tmp_path):
    if torch.cuda.device_count() < 2:
        # TRL syncs weights to the server over NCCL, which refuses two ranks on one device.
        pytest.skip("vllm_server needs a GPU for the server apart from the trainer's")
    out = _run(tmp_path, backend="vllm_server", gpus=[torch.cuda.device_count() - 1], health_timeout_s=900)
    log = (out / "vllm_server.log").read_text()
    assert log.strip(), "the server wrote no log"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pid = next(r for r in records if r.get("event") == "rollout_server")["pid"]
    with pytest.raises(ProcessLookupError):  # stopped, and reaped by the stage
        os.killpg(pid, 0)
