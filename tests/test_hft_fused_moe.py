"""HFT and LoRA through the real sft stage on tiny MoE and fused-projection models, checked on disk.

After a few AdamW steps with weight decay (which moves zero-gradient entries unless the guard restores them):
every frozen tensor and every frozen slice of a partly trained tensor (experts of an expert stack, rows of a
fused qkv) is bit-identical in the saved safetensors, and every trained tensor and trained slice moved.
transformers saves in the checkpoint layout of each family: MoE experts one tensor per expert
(`experts.<e>.w1.weight` for Mixtral, `experts.<e>.gate_proj.weight` for Qwen2-MoE), so expert e's files follow
the draw of expert e; NeoX's lm_head as `embed_out`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import posttrain.stages  # noqa: F401
from posttrain.config import load_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.world.tuning import world_trainer
from tests.conftest import load_tensors, tiny_tokenizer, tiny_words
from tests.test_hft_layouts import tiny_config

TRAINER = world_trainer("sft", max_steps=3, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-2,
                        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, save_steps=50)


def _model_folder(folder: Path, kind: str) -> Path:
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(tiny_words(64))
    torch.manual_seed(0)
    cfg = tiny_config(kind, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _sft(tmp_path: Path, kind: str, **stage) -> Path:
    """One sft stage of 3 steps on a fresh tiny `kind`; returns the stage folder."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}", "completion": f" w{i + 2} w{i + 3}"}) + "\n"
                            for i in range(8)))
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
        {"kind": "sft", "model": str(_model_folder(tmp_path / "in", kind)), "data": [{"source": str(data)}],
         "trainer": TRAINER, **stage}]})
    run_pipeline(cfg, tmp_path / "run", lambda m: None)
    return tmp_path / "run" / "stages" / "01_sft"


def _decision(mask: dict, key: str):
    """What the mask says about a saved tensor: True, False, or {"dim", "trained", "of"} (a partial one)."""
    expert = re.match(r"^(.*\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.", key)
    if expert:  # saved per expert: follows expert e of the in-memory stack
        stack = mask[f"{expert[1]}.mlp.experts.gate_up_proj"]
        e = int(expert[2])
        return stack if isinstance(stack, bool) else any(a <= e < b for a, b in stack["trained"])
    return mask[{"embed_out.weight": "lm_head.weight"}.get(key, key).replace(".block_sparse_moe.", ".mlp.")]


def _slices(tensor: torch.Tensor, part: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    keep = torch.zeros(part["of"], dtype=torch.bool)
    for a, b in part["trained"]:
        keep[a:b] = True
    frozen = tensor.index_select(part["dim"], torch.arange(part["of"])[~keep])
    return frozen, [tensor.narrow(part["dim"], a, b - a) for a, b in part["trained"]]


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("kind", ["qwen2_moe", "mixtral", "gpt2", "phi3", "gpt_neox"])
def test_hft_frozen_slices_stay_bit_identical_on_disk_and_trained_ones_move(tmp_path, kind):
    out = _sft(tmp_path, kind, trainable={"mode": "hft", "seed": 1})
    before, after = load_tensors(tmp_path / "in"), load_tensors(out / "model")
    info = json.loads((out / "trainable.json").read_text())
    assert set(before) == set(after)
    partial = frozen_moved = trained_still = 0
    for key in before:
        on = _decision(info["parameters"], key)
        if isinstance(on, dict):
            partial += 1
            (f0, t0), (f1, t1) = _slices(before[key], on), _slices(after[key], on)
            frozen_moved += _bytes(f0) != _bytes(f1)
            trained_still += sum(torch.equal(a, b) for a, b in zip(t0, t1))
        elif on:
            trained_still += torch.equal(before[key], after[key])
        else:
            frozen_moved += _bytes(before[key]) != _bytes(after[key])
    assert frozen_moved == trained_still == 0
    assert partial > 0 if kind in ("gpt2", "phi3", "gpt_neox") else partial == 0  # MoE: saved per expert
    shares = info["blocks"]
    assert len(shares) == 2 and all(0.2 < s["total"] < 0.8 and set(s) == {"attn", "mlp", "total"}
                                    for s in shares.values())
    assert ("moe" in info) == (kind in ("qwen2_moe", "mixtral"))


def test_lora_all_linear_on_moe_trains_and_merges_the_routed_experts(tmp_path):
    out = _sft(tmp_path, "qwen2_moe", lora={"r": 2, "alpha": 4})
    info = json.loads((out / "trainable.json").read_text())
    stacks = {f"model.layers.{b}.mlp.experts.{t}" for b in range(2) for t in ("gate_up_proj", "down_proj")}
    assert stacks <= set(info["lora"]["parameters"])
    adapter = load_tensors(out / "adapter")
    assert any(".mlp.experts." in k for k in adapter) and info["trained"] == sum(t.numel() for t in adapter.values())
    before, after = load_tensors(tmp_path / "in"), load_tensors(out / "model")
    moved = {k for k in before if ".mlp.experts." in k and not torch.equal(before[k], after[k])}
    assert {re.match(r".*layers\.(\d+)\.", k)[1] for k in moved} == {"0", "1"}  # merged into every block's experts
