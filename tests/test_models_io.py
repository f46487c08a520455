"""What a trained stage writes and how model references resolve: the output keeps the input's stored dtype
(so a fine-tune still merges against its base), the generation config keeps every stop id, a mistyped local
folder fails in one line instead of going to the hub, and a trainable regex that matches nothing exits 2."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import posttrain.hub_pins
import posttrain.stages  # noqa: F401
import posttrain.stages.trl_run as trl_run
from posttrain.config import ConfigError, load_pipeline
from posttrain.hft import TrainableConfig, select_trainable
from posttrain.models import ModelError, cast_saved_weights, resolve_model, saved_dtype
from posttrain.pipeline import run_pipeline
from posttrain.stages.common import eos_ids
from posttrain.world.tuning import world_trainer
from tests.conftest import make_tiny_llama, tiny_words
from tests.tiny_archs import headers as _headers
from tests.tiny_archs import tensor_bytes as _tensor_bytes

# A constant 1e-2 moves every trained tensor by more than bf16's spacing at 1.0 (2**-7), norms included.
TINY = world_trainer("sft", max_steps=2, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-2,
                     lr_scheduler_type="constant", warmup_steps=0, save_steps=50)


def _sft(tmp_path: Path, model: Path, **stage) -> Path:
    """One tiny SFT stage on `model` (prompt/completion rows of the tiny vocabulary); returns model/."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1}", "completion": f" w{i + 2}"}) + "\n"
                            for i in range(8)))
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
        {"kind": "sft", "model": str(model), "data": [{"source": str(data)}], "trainer": TINY, **stage}]})
    run_pipeline(cfg, tmp_path / "run", lambda m: None)
    return tmp_path / "run" / "stages" / "01_sft" / "model"


# ---- dtype: a trained stage writes the dtype its input is stored in ----------------------------------------------

def test_saved_dtype_reads_the_weights_not_the_config(tmp_path):
    bf16 = make_tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16, shard="8KB")
    assert len(list(bf16.glob("*.safetensors"))) > 1 and saved_dtype(str(bf16)) == "bfloat16"
    f32 = make_tiny_llama(tmp_path / "f32")
    assert saved_dtype(str(f32)) == "float32"
    # A config that claims float32 over bf16 weights: the weights decide (they are what a merge compares).
    lying = make_tiny_llama(tmp_path / "lying", dtype=torch.bfloat16)
    config = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    assert saved_dtype(str(lying)) == "bfloat16"
    # No safetensors (pickle weights, unread): the config's dtype, old or new key; "auto" is unknown.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    for config, expected in (({"torch_dtype": "float16"}, "float16"), ({"dtype": "auto"}, None), ({}, None)):
        (pickled / "config.json").write_text(json.dumps(config))
        assert saved_dtype(str(pickled)) == expected
    assert saved_dtype("some-org/not-cached-anywhere") is None and saved_dtype(None) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sft_output_keeps_the_input_dtype_and_hft_frozen_tensors_keep_their_bytes(tmp_path, dtype):
    model = make_tiny_llama(tmp_path / "in", dtype=dtype)
    out = _sft(tmp_path, model, trainable={"mode": "hft"})
    name = str(dtype).removeprefix("torch.")
    code = {"bfloat16": "BF16", "float32": "F32"}[name]
    assert {h["dtype"] for h in _headers(out).values()} == {code}
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    before, after = _tensor_bytes(model), _tensor_bytes(out)
    trained = json.loads((out.parent / "trainable.json").read_text())["parameters"]
    assert set(before) == set(after) == set(trained)
    assert all(before[k] == after[k] for k, t in trained.items() if not t)  # frozen: byte for byte
    assert [k for k, t in trained.items() if t and before[k] == after[k]] == []  # trained: moved


def test_lora_merged_output_keeps_a_bf16_input_bf16(tmp_path):
    model = make_tiny_llama(tmp_path / "in", dtype=torch.bfloat16)
    out = _sft(tmp_path, model, lora={"r": 2, "alpha": 4})
    assert {h["dtype"] for h in _headers(out).values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_float32_input_trained_in_bf16_as_on_a_gpu_comes_out_float32(tmp_path, monkeypatch):
    """On a bf16 GPU load_model trains a float32 model in bf16; its output must be float32 again so that it
    still merges against the float32 base (the world's specialists against the world base)."""
    real = trl_run.load_model
    monkeypatch.setattr(trl_run, "load_model", lambda ref, **kw: real(ref, **{**kw, "dtype": "bfloat16"}))
    model = make_tiny_llama(tmp_path / "in")
    out = _sft(tmp_path, model)
    assert {h["dtype"] for h in _headers(out).values()} == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_cast_saved_weights_rewrites_shards_index_and_config(tmp_path):
    """The FSDP/DeepSpeed path: the trainer wrote the folder, so its files are cast afterwards."""
    folder = make_tiny_llama(tmp_path / "m", shard="8KB")
    before = {k: torch.frombuffer(bytearray(v), dtype=torch.float32) for k, v in _tensor_bytes(folder).items()}
    assert cast_saved_weights(folder, "bfloat16")
    heads = _headers(folder)
    assert {h["dtype"] for h in heads.values()} == {"BF16"} and set(heads) == set(before)
    after = {k: torch.frombuffer(bytearray(v), dtype=torch.bfloat16) for k, v in _tensor_bytes(folder).items()}
    assert all(torch.equal(after[k], before[k].to(torch.bfloat16)) for k in before)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in before.values())
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert not cast_saved_weights(folder, "bfloat16")  # already so: nothing rewritten


# ---- generation config: every stop id survives training -----------------------------------------------------------

def test_eos_ids_put_the_tokenizer_eos_first_and_keep_the_others():
    assert eos_ids(2, [3, 2, 5]) == [2, 3, 5]
    assert eos_ids(2, [3, 5]) == [2, 3, 5]
    assert eos_ids(2, 2) == 2 and eos_ids(2, None) == 2 and eos_ids(2, 3) == [2, 3]
    assert eos_ids(None, [3, 5]) == [3, 5] and eos_ids(None, None) is None


def test_sft_keeps_a_list_of_eos_ids(tmp_path):
    model = make_tiny_llama(tmp_path / "in")
    gen = json.loads((model / "generation_config.json").read_text())
    eot = tiny_words(64).index("<eot>")
    (model / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eot, gen["eos_token_id"]]}))
    out = _sft(tmp_path, model)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [gen["eos_token_id"], eot]


# ---- model references --------------------------------------------------------------------------------------------

def _cache_hub_model(cache: Path, name: str) -> Path:
    """A hub cache entry for `name` as huggingface_hub lays it out (refs/main -> snapshots/<sha>/)."""
    repo = cache / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def test_mistyped_local_folder_is_refused_with_a_did_you_mean(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    make_tiny_llama(tmp_path / "models" / "llama_a", tokenizer=False)
    with pytest.raises(ModelError, match=r"^model 'models/llama_aa' is not a folder: models has no 'llama_aa' "
                                         r"\(did you mean 'llama_a'\?\), and no hub model of that name is cached"):
        resolve_model("models/llama_aa", log=lambda m: None)
    (tmp_path / "models" / "deeper").mkdir()
    with pytest.raises(ModelError, match=r"is not a folder: models/deeper has no 'x'"):  # not hub-shaped
        resolve_model("models/deeper/x", log=lambda m: None)
    assert resolve_model("models/llama_a") == str((tmp_path / "models" / "llama_a").resolve())


def test_hub_names_still_go_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    import socket

    from posttrain.models import ModelError

    # Not cached and the hub's host does not resolve (this machine): one line at once, not ~25 s of retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(socket.gaierror(-2, "no")))
    with pytest.raises(ModelError, match=r"'Qwen/Qwen2.5-0.5B' is not a folder.*the hub \(huggingface.co\) cannot"):
        resolve_model("Qwen/Qwen2.5-0.5B")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        resolve_model("Qwen/Qwen2.5-0.5B")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])  # a reachable hub: asked for the snapshot
    fetched = []  # huggingface_hub's boundary: the commit main points at, downloaded (weights: safetensors)
    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / ("c" * 40)

    def download(name, revision=None, allow_patterns=None, ignore_patterns=None):
        fetched.append((name, revision, "*.safetensors" in allow_patterns, "*.bin" in allow_patterns))
        assert "*/*" in ignore_patterns  # no subfolder: from_pretrained reads none (`original/` weights)
        snap.mkdir(parents=True, exist_ok=True)
        return str(snap)

    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(posttrain.hub_pins, "_ONLINE", {})  # what this process asked the hub: nothing yet
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_model("Qwen/Qwen2.5-0.5B") == str(snap)  # no local Qwen/: a hub name, at a commit
    # No safetensors in it: pickles are fetched too, at the same commit (check_weights refuses them unasked).
    assert fetched == [("Qwen/Qwen2.5-0.5B", None, True, False), ("Qwen/Qwen2.5-0.5B", "c" * 40, True, True)]
    assert resolve_model("Qwen/Qwen2.5-0.5B") == str(snap) and len(fetched) == 2  # asked once per process
    (tmp_path / "models").mkdir()
    snapshot = _cache_hub_model(tmp_path / "hub", "models/cached")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("models/cached") == str(snapshot)  # a local models/ too, but the hub has it cached
    make_tiny_llama(snapshot, dtype=torch.bfloat16, tokenizer=False)
    assert saved_dtype("models/cached") == "bfloat16"  # and its dtype is read from the cache


def test_bare_hub_names_resolve_and_train_from_the_hub_cache(tmp_path, monkeypatch):
    """`gpt2` is a hub name: offline, with the model in the hub cache, a stage trains from it. A typo of a world
    model's name (`wrold`) or a name in the world's namespace is still refused, at load, with the did-you-mean,
    and so is a name the hub does not allow."""
    import huggingface_hub.constants
    from transformers import AutoModelForCausalLM

    from tests.tiny_archs import make_tiny

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    snapshot = _cache_hub_model(tmp_path / "hub", "gpt2")
    make_tiny("gpt2", snapshot)
    assert resolve_model("gpt2") == str(snapshot)  # the snapshot folder of the commit main points at
    run_dir = tmp_path / "run"
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
        {"kind": "sft", "model": "gpt2", "data": [{"source": "arithmetic", "limit": 4}], "trainer": TINY}]})
    run_pipeline(cfg, run_dir, lambda m: None)
    out = run_dir / "stages" / "01_sft" / "model"
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "GPT2LMHeadModel"
    for ref, hint in (("wrold", " (did you mean 'world'"), ("world-sftt", " (did you mean 'world-sft'")):
        with pytest.raises(ModelError, match=rf"^model '{ref}' is not a folder, a world model{re.escape(hint)}"):
            resolve_model(ref, log=lambda m: None)
        with pytest.raises(ConfigError, match=rf"stages\[0\]\.model: model '{ref}' is not a folder, a world model"):
            load_pipeline(None, data={"stages": [{"kind": "sft", "model": ref}]})
    with pytest.raises(ModelError, match=r"^model 'my model' is not a folder, a world model or a hub name"):
        resolve_model("my model", log=lambda m: None)
    snapshot = _cache_hub_model(tmp_path / "hub", "wrold")  # a hub model of that name, downloaded: it is one
    assert resolve_model("wrold") == str(snapshot)


# ---- a trainable regex that matches nothing is a config error (exit 2) --------------------------------------------

def test_trainable_pattern_matching_nothing_is_a_config_error():
    from posttrain.cli import _bad_input_types

    with pytest.raises(ConfigError, match="trainable pattern 'nomatch' matches no parameter") as err:
        select_trainable(["lm_head.weight"], TrainableConfig(mode="patterns", train=["nomatch"]), 1)
    assert isinstance(err.value, _bad_input_types())  # what the CLI answers with exit 2 and one line
