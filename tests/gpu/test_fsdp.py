"""An SFT stage under FSDP2 (configs/accelerate/fsdp.yaml: FULL_SHARD, transformer-layer wrap, full state dict)
on every visible GPU, up to 2: the sharded weights are gathered into one whole HF folder, written once.

Marked `gpu` (skipped without CUDA by tests/conftest.py). One GPU still runs FSDP (a world of one): the
wrapping, the sharded optimizer and the gathering save are the same code paths.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.world.tuning import world_trainer

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parent.parent.parent


def test_sft_under_fsdp_writes_one_whole_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.models import resolve_model

    procs = min(2, torch.cuda.device_count())
    stage = {"kind": "sft", "model": "world", "data": [{"source": "arithmetic", "limit": 512}],
             "trainer": world_trainer("sft", learning_rate=2e-3, max_steps=20, per_device_train_batch_size=16,
                                      warmup_steps=2, logging_steps=5, save_steps=1000, max_length=64)}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(stage))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "posttrain", "stage", "sft", "--config", str(tmp_path / "sft.yaml"),
           "--set", "eval.enabled=false", "--run-dir", str(run_dir), "--launcher", "accelerate",
           "--accelerate-config", str(REPO / "configs/accelerate/fsdp.yaml"), "--num-processes", str(procs)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, r.stderr[-3000:]
    stage_dir = run_dir / "stages" / "01_sft"
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    model_dir = stage_dir / "model"
    assert not (model_dir / "training_args.bin").exists()  # safetensors only
    before = load_file(f"{resolve_model('world')}/model.safetensors")
    after = {}
    for f in model_dir.glob("*.safetensors"):
        after.update(load_file(str(f)))
    assert set(after) >= {k for k in before if "rotary" not in k}  # whole weights, not one rank's shard
    name = next(k for k in before if k.endswith("mlp.up_proj.weight"))
    assert after[name].shape == before[name].shape and not torch.equal(after[name].float(), before[name].float())
    AutoModelForCausalLM.from_pretrained(model_dir)
