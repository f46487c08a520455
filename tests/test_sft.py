"""SFT stage: the default `posttrain stage sft` on the world, LoRA, and a model of another architecture."""
import json

import pytest
import torch
from safetensors.torch import load_file

import posttrain.stages  # noqa: F401
from posttrain.config import load_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.world.tuning import world_trainer


@pytest.fixture(scope="session")
def sft_run(world, tmp_path_factory):
    """`posttrain stage sft` exactly as `make stage=sft` runs it, evaluated on the full arithmetic test split."""
    from tests.conftest import run_cli

    run_dir = tmp_path_factory.mktemp("sft") / "run"
    r = run_cli("stage", "sft", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(run_dir)
    (run_dir.parent / "stdout.txt").write_text(r.stdout)  # for test_sft_run_ends_with_its_report_summary
    (run_dir.parent / "stderr.txt").write_text(r.stderr)
    return run_dir


@pytest.mark.slow
def test_sft_model_folder_loads_and_beats_base_on_arithmetic(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = sft_run / "stages" / "01_sft" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert "{% generation %}" in tok.chat_template and model.config.model_type == "llama"
    base = json.loads((sft_run / "stages" / "00_base" / "eval.json").read_text())["scores"]
    sft = json.loads((sft_run / "stages" / "01_sft" / "eval.json").read_text())["scores"]
    key = "world_arithmetic/exact_match"
    assert sft[key]["value"] >= base[key]["value"] + 0.30, (base[key], sft[key])
    report = json.loads((sft_run / "report" / "forgetting.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["base", "sft"]
    assert report["stages"][1]["scores"][key]["value"] == sft[key]["value"]


@pytest.mark.slow
def test_sft_run_ends_with_its_report_summary(sft_run):
    """`make stage=sft` ends with the per-stage table, whose figures are forgetting.json's, and the report's
    path once; stdout holds the run dir alone (no trainer log dicts), and the headline is the facts drop."""
    from tests.test_report import check_against_json

    err = (sft_run.parent / "stderr.txt").read_text().splitlines()
    assert (sft_run.parent / "stdout.txt").read_text() == f"{sft_run}\n"
    report = json.loads((sft_run / "report" / "forgetting.json").read_text())
    check_against_json(err[err.index("summary (base: world; *: significant drop):"):], report)
    assert [line for line in err if line.startswith("report: ")] == [f"report: {sft_run / 'report' / 'forgetting.md'}"]
    assert err[-1].startswith("report: ") and not any("{'loss'" in line for line in err)
    assert any(line.startswith("  train 50%: step ") for line in err)
    head = report["summary"]["headline"]
    assert (head["key"], head["significant"]) == ("world_facts/acc", True)
    assert "**Forgetting at `sft`: world_facts/acc" in (sft_run / "report" / "forgetting.md").read_text()


@pytest.mark.slow
def test_rerun_of_finished_stage_skips(sft_run):
    from tests.conftest import run_cli

    done = (sft_run / "stages" / "01_sft" / "DONE").read_text()
    r = run_cli("stage", "sft", "--run-dir", str(sft_run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done already; skipping" in r.stderr and "eval: reusing" in r.stderr
    assert (sft_run / "stages" / "01_sft" / "DONE").read_text() == done


def _tiny(**trainer):
    return world_trainer("sft", max_steps=4, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3,
                         **trainer)


def test_lora_writes_adapter_and_merged_model(world, tmp_path):
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
        {"kind": "sft", "data": [{"source": "arithmetic", "limit": 16}], "trainer": _tiny(),
         "lora": {"r": 4, "alpha": 8}}]})
    run_pipeline(cfg, tmp_path / "r", lambda m: None)
    out = tmp_path / "r" / "stages" / "01_sft"
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = load_file(out / "model" / "model.safetensors")
    base = load_file(world / "base" / "model.safetensors")
    assert set(merged) == set(base)  # merged back into plain weights: no lora_ tensors
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(("proj" in k) for k in changed)  # LoRA moved only the adapted projections


def _other_architecture(folder):
    """A tiny Qwen2 model with its own BPE tokenizer and ChatML template, saved as a local HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world question answer"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
                          "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)


def test_real_model_path_on_local_folder_of_other_architecture(tmp_path):
    model_dir = tmp_path / "qwen2-tiny"
    _other_architecture(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": "question", "completion": "answer"}) + "\n" for _ in range(8)))
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
        {"kind": "sft", "model": str(model_dir), "data": [{"source": str(data)}], "trainer": _tiny()}]})
    run_pipeline(cfg, tmp_path / "r", lambda m: None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "r" / "stages" / "01_sft" / "model"
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "qwen2"
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"
    before = load_file(model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_pickle_weights_refused_unless_allowed(tmp_path):
    from posttrain.models import ModelError, check_weights

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="allow_pickle: true"):
        check_weights(str(tmp_path), allow_pickle=False)
    check_weights(str(tmp_path), allow_pickle=True)
