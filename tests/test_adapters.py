"""Adapters and efficiency (issue 22): DoRA trains and merges, QLoRA is refused without CUDA, packed SFT trains the
same tokens as unpacked (TRL #3728 lost the assistant mask under packing)."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import posttrain.stages  # noqa: F401
from posttrain.config import load_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.schema import ConfigError
from posttrain.world.tuning import world_trainer


def _chat_rows(path, n=12):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"},
                          {"role": "user", "content": "And doubled?"},
                          {"role": "assistant", "content": f"{4 * i}" * (1 + i % 3)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dora_trains_and_merges_to_a_loadable_folder(world, tmp_path):
    """model/ is the DoRA adapter merged: it loads as a plain model whose logits equal base + adapter through
    peft (the merge identity), and only the adapted projections moved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
        {"kind": "sft", "data": [{"source": "arithmetic", "limit": 16}], "lora": {"r": 4, "alpha": 8, "use_dora": True},
         "trainer": world_trainer("sft", max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)}]})
    run_pipeline(cfg, tmp_path / "r", lambda m: None)
    out = tmp_path / "r" / "stages" / "01_sft"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert any("lora_magnitude_vector" in k for k in load_file(out / "adapter" / "adapter_model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert not any("lora" in k for k in merged.state_dict())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "base"), out / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
    base = load_file(world / "base" / "model.safetensors")
    now = load_file(out / "model" / "model.safetensors")
    changed = [k for k in base if not torch.equal(base[k], now[k])]
    assert changed and all("proj" in k for k in changed)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_is_refused_at_load_without_cuda(bits):
    with pytest.raises(ConfigError) as e:
        load_pipeline(None, data={"stages": [{"kind": "sft", "lora": {"quantize": bits}}]})
    line = str(e.value)
    assert "\n" not in line and "lora.quantize" in line and "CUDA" in line


def test_dora_on_expert_tensors_is_refused_in_one_line():
    """peft's ParamWrapper (routed experts) has no DoRA: refused before peft raises deep in the wrap."""
    from posttrain.stages.selection import LoraSpec, lora_config
    from posttrain.hft import TrainableConfig

    stage = SimpleNamespace(lora=LoraSpec(use_dora=True, target_parameters=["mlp.experts.gate_up_proj"]),
                            trainable=TrainableConfig())
    with pytest.raises(ConfigError, match="lora.use_dora"):
        lora_config(None, stage, {}, [])
    stage.lora = LoraSpec(use_dora=True, target_modules=["q_proj"], target_parameters=[])
    assert lora_config(None, stage, {}, []).use_dora is True


def test_new_adapter_fields_keep_old_config_hashes():
    """Fields at their defaults stay out of the dump the DONE hash is taken of: finished stages do not rerun."""
    from posttrain.stages.sft import SFTStageConfig

    dump = SFTStageConfig(lora={"r": 4}).model_dump()
    assert "use_dora" not in dump["lora"] and "quantize" not in dump["lora"]
    assert "packing" not in dump and "padding_free" not in dump
    assert SFTStageConfig(packing=True).model_dump()["packing"] is True


def _prepared(monkeypatch, tmp_path, model, data, **sft):
    """The dataset SFTTrainer trains on for one sft stage (training itself stubbed out)."""
    import posttrain.stages.trl_run as trl_run

    seen = {}

    def capture(trainer, tokenizer, ctx, lora, unquantized=None):
        seen["dataset"] = trainer.train_dataset
        raise KeyboardInterrupt  # stop before training; nothing to save

    monkeypatch.setattr(trl_run, "train_and_save", capture)
    stage = {"kind": "sft", "data": [{"source": str(data)}], "trainer": world_trainer("sft", max_length=512), **sft}
    if model:
        stage["model"] = str(model)
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [stage]})
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / f"r{len(list(tmp_path.iterdir()))}", lambda m: None)
    return seen["dataset"]


def _pieces(dataset) -> list[tuple[tuple, tuple]]:
    """(input_ids, labels) of every row; a packed row is cut back into its rows at its seq_lengths."""
    out = []
    for row in dataset:
        lengths = row.get("seq_lengths") or [len(row["input_ids"])]
        start = 0
        for n in lengths:
            out.append((tuple(row["input_ids"][start:start + n]), tuple(row["labels"][start:start + n])))
            start += n
    return sorted(out)


@pytest.mark.parametrize("template", ["world", "unmarked"])
def test_packed_labels_equal_unpacked_on_chat_rows(world, tmp_path, monkeypatch, template):
    """Packing changes which rows share a sequence, never which tokens carry loss: cut at its seq_lengths, the
    packed dataset is the unpacked one, labels included, for the world's marked template and for a template
    posttrain masks itself (tests/test_sft.py's Qwen2 with an unmarked ChatML template)."""
    from tests.test_sft import _other_architecture

    model = None
    if template == "unmarked":
        model = tmp_path / "qwen2"
        _other_architecture(model)
    data = _chat_rows(tmp_path / "chat.jsonl")
    plain = _prepared(monkeypatch, tmp_path, model, data)
    packed = _prepared(monkeypatch, tmp_path, model, data, packing=True)
    assert len(packed) < len(plain)  # rows really were packed together
    assert _pieces(packed) == _pieces(plain)
    masked = [lab for _, labels in _pieces(plain) for lab in labels]
    assert -100 in masked and any(lab != -100 for lab in masked)  # the assistant mask is there to keep


def test_packing_without_a_max_length_is_refused_when_the_config_loads():
    from posttrain.config import ConfigError, load_pipeline

    with pytest.raises(ConfigError, match=r"packing: rows are packed into trainer.max_length"):
        load_pipeline(None, data={"stages": [{"kind": "sft", "packing": True, "trainer": {"max_length": None}}]})
