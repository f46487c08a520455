"""Streaming safetensors reader/writer: round trips over several shards, the HF index format, loading the
written folder with transformers, mismatch refusals and the pickle refusal. All models are built here."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from posttrain.merging.compat import check_compatible
from posttrain.tensor_writer import ShardedWriter
from posttrain.tensors import (
    INDEX_FILE,
    SINGLE_FILE,
    MergeMismatch,
    PickleRefused,
    ShardedReader,
    sha256_file,
)


def write(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 10**9) -> Path:
    with ShardedWriter(folder, max_shard_bytes=max_shard_bytes) as w:
        for name, t in tensors.items():
            w.add(name, t)
    return folder


def small_model(vocab: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(vocab, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(4, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(4),
        "lm_head.weight": torch.randn(vocab, 4, generator=g),
        "step": torch.tensor([7], dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny Llama (hidden 16, 2 layers, vocab 64) saved by transformers in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder, max_shard_size="8KB")
    return model, folder


# ---------------------------------------------------------------------------------------------- writer


def test_sharded_round_trip_and_index(tmp_path):
    tensors = small_model()
    write(tmp_path, tensors, max_shard_bytes=200)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n == 3  # bytes 128 | 96+8+16 | 128+8: a shard is written before it would pass 200
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files + [INDEX_FILE])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    for file in files:
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == file)
    reader = ShardedReader(tmp_path)
    assert reader.names() == sorted(tensors)
    for name, t in tensors.items():
        got = reader.get(name)
        assert got.dtype == t.dtype and reader.dtype(name) == t.dtype
        assert reader.shape(name) == tuple(t.shape)
        assert torch.equal(got, t)


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    tensors = small_model()
    write(tmp_path, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    reader = ShardedReader(tmp_path)
    assert all(torch.equal(reader.get(k), v) for k, v in tensors.items())


def test_tensor_larger_than_a_shard_gets_its_own(tmp_path):
    with ShardedWriter(tmp_path, max_shard_bytes=16) as w:
        w.add("a", torch.zeros(2))  # 8 bytes
        w.add("big", torch.zeros(100))  # 400 bytes
        w.add("b", torch.zeros(2))
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert weight_map == {
        "a": "model-00001-of-00003.safetensors",
        "b": "model-00003-of-00003.safetensors",
        "big": "model-00002-of-00003.safetensors",
    }


def test_writer_copies_tied_and_viewed_tensors(tmp_path):
    shared = torch.arange(12, dtype=torch.float32).view(3, 4)
    with ShardedWriter(tmp_path) as w:
        w.add("embed", shared)
        w.add("head", shared)  # same storage: safetensors alone would refuse
        w.add("col", shared[:, 1])  # non-contiguous view
        shared.add_(100)  # changes after add() must not reach the file
    reader = ShardedReader(tmp_path)
    assert reader.get("head").tolist() == torch.arange(12.0).view(3, 4).tolist()
    assert reader.get("col").tolist() == [1.0, 5.0, 9.0]


def test_writer_refusals(tmp_path):
    w = ShardedWriter(tmp_path / "a")
    w.add("x", torch.zeros(1))
    with pytest.raises(ValueError, match="'x' was added twice"):
        w.add("x", torch.zeros(1))
    w.close()
    with pytest.raises(ValueError, match="after close"):
        w.add("y", torch.zeros(1))
    with pytest.raises(FileExistsError, match="already holds weights"):
        ShardedWriter(tmp_path / "a")
    with pytest.raises(ValueError, match="no tensors were added"):
        ShardedWriter(tmp_path / "empty").close()


# ------------------------------------------------------------------------------------ transformers folders


def test_reads_transformers_shards(tiny_llama, monkeypatch):
    model, folder = tiny_llama
    import safetensors.torch

    # Streaming: whole-file loads are not allowed to be used.
    def refuse(*a, **k):
        raise AssertionError("whole-file load")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    index = json.loads((folder / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    reader = ShardedReader(folder)
    state = model.state_dict()
    assert reader.names() == sorted(state)
    for name in reader.names():
        assert reader.file_of(name) == index["weight_map"][name]
        assert torch.equal(reader.get(name), state[name])


def test_written_folder_loads_with_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model, folder = tiny_llama
    out = tmp_path / "copy"
    with ShardedReader(folder) as reader, ShardedWriter(out, max_shard_bytes=6000) as writer:
        for name in reader.names():
            writer.add(name, reader.get(name))
    shutil.copy(folder / "config.json", out / "config.json")
    assert len(json.loads((out / INDEX_FILE).read_text())["weight_map"]) == len(model.state_dict())
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    ids = torch.tensor([[1, 5, 9, 63]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# ------------------------------------------------------------------------------------------- mismatches


def test_identical_models_are_compatible(tmp_path):
    a = ShardedReader(write(tmp_path / "a", small_model()))
    b = ShardedReader(write(tmp_path / "b", small_model(), max_shard_bytes=100))
    check_compatible([a, b])  # same tensors, different sharding: fine


def test_missing_tensor_is_named(tmp_path):
    other = small_model()
    del other["model.norm.weight"]
    a = ShardedReader(write(tmp_path / "a", small_model()))
    b = ShardedReader(write(tmp_path / "b", other))
    with pytest.raises(MergeMismatch, match=r"tensor 'model.norm.weight' is in .*a but not in .*b"):
        check_compatible([a, b])
    with pytest.raises(MergeMismatch, match=r"tensor 'model.norm.weight' is in .*a but not in .*b"):
        check_compatible([b, a])
    check_compatible([a, b], names=False)


def test_shape_difference_is_named(tmp_path):
    other = small_model()
    other["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 4)
    a = ShardedReader(write(tmp_path / "a", small_model()))
    b = ShardedReader(write(tmp_path / "b", other))
    expected = r"'model.layers.0.mlp.up_proj.weight' has shape \[6, 4\] in .* but \[5, 4\]"
    with pytest.raises(MergeMismatch, match=expected):
        check_compatible([a, b])
    check_compatible([a, b], shapes=False)


def test_dtype_difference_is_named(tmp_path):
    other = small_model()
    other["model.norm.weight"] = torch.ones(4, dtype=torch.float16)
    a = ShardedReader(write(tmp_path / "a", small_model()))
    b = ShardedReader(write(tmp_path / "b", other))
    with pytest.raises(MergeMismatch, match=r"'model.norm.weight' is float32 in .* but float16 in"):
        check_compatible([a, b])


def test_vocabulary_difference_points_to_transfer(tmp_path):
    a = ShardedReader(write(tmp_path / "a", small_model(vocab=8)))
    b = ShardedReader(write(tmp_path / "b", small_model(vocab=10)))
    # lm_head sorts first, so it is the tensor named
    with pytest.raises(MergeMismatch) as err:
        check_compatible([a, b])
    assert str(err.value) == (
        "tensor 'lm_head.weight': vocabulary sizes differ (8 vs 10); use the transfer stage to align vocabularies"
    )


# ---------------------------------------------------------------------------------------- pickle, misc


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleRefused, match="pytorch_model.bin.*pass allow_pickle=True") as err:
        ShardedReader(tmp_path)
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)
    reader = ShardedReader(tmp_path, allow_pickle=True)
    assert reader.names() == ["w"]
    assert reader.get("w").tolist() == [0.0, 1.0, 2.0]


def test_empty_folder_and_missing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ShardedReader(tmp_path)
    folder = write(tmp_path / "m", small_model(), max_shard_bytes=200)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors, which is missing"):
        ShardedReader(folder)


def test_unknown_tensor_name(tmp_path):
    reader = ShardedReader(write(tmp_path, small_model()))
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        reader.get("nope")


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_bytes=4096) == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_layout_writer_streams_the_same_shards_and_values_as_the_buffered_writer(tmp_path: Path) -> None:
    tensors = {**small_model(), "model.layers.0.count": torch.arange(3), "model.flag": torch.tensor(True),
               "model.empty": torch.zeros(0, 4)}
    names = sorted(tensors)
    buffered = tmp_path / "buffered"
    with ShardedWriter(buffered, max_shard_bytes=100) as w:
        for n in names:
            w.add(n, tensors[n])
    layout = [(n, tuple(tensors[n].shape), tensors[n].dtype) for n in names]
    streamed = tmp_path / "streamed"
    with ShardedWriter(streamed, max_shard_bytes=100, layout=layout) as w:
        for n in reversed(names):  # any order: each tensor has its place
            w.add(n, tensors[n])
    assert w.files == sorted(p.name for p in buffered.glob("*.safetensors"))
    assert json.loads((streamed / INDEX_FILE).read_text()) == json.loads((buffered / INDEX_FILE).read_text())
    for file in w.files:  # safetensors itself accepts the hand-written headers
        with safe_open(str(streamed / file), "pt") as f:
            for n in f.keys():
                assert torch.equal(f.get_tensor(n), tensors[n]) and f.get_tensor(n).dtype == tensors[n].dtype
    with ShardedReader(streamed) as r:
        assert r.names() == names
        for n in names:
            assert torch.equal(r.get(n), tensors[n])


def test_layout_writer_refuses_strangers_mismatches_and_an_early_close(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path / "a", layout=[("x", (2,), torch.float32), ("y", (3,), torch.float32)])
    with pytest.raises(ValueError, match="'z' is not in the writer's layout"):
        w.add("z", torch.zeros(2))
    with pytest.raises(ValueError, match=r"'x' is \[3\] torch.float32; the layout says \[2\]"):
        w.add("x", torch.zeros(3))
    w.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="close\\(\\) before tensor 'y'"):
        w.close()
    assert not (tmp_path / "a" / SINGLE_FILE).exists()


def test_read_flat_equals_slicing_get_and_reuses_the_buffer(tmp_path: Path) -> None:
    tensors = small_model(vocab=10)
    folder = write(tmp_path / "m", tensors, max_shard_bytes=100)  # several shards
    with ShardedReader(folder) as r:
        for name, t in tensors.items():
            flat = t.reshape(-1)
            n = flat.numel()
            for start, stop in [(0, n), (0, 0), (1, n), (n // 3, 2 * n // 3 + 1), (n - 1, n)]:
                got = r.read_flat(name, start, stop)
                assert got.dtype == t.dtype and torch.equal(got, flat[start:stop]), (name, start, stop)
        buf = torch.full((64,), -1.0)
        got = r.read_flat("lm_head.weight", 5, 15, out=buf)
        assert got.data_ptr() == buf.data_ptr()  # the slice lands in the caller's buffer
        assert torch.equal(got, tensors["lm_head.weight"].reshape(-1)[5:15]) and buf[10].item() == -1.0
        with pytest.raises(IndexError, match="outside its 40"):
            r.read_flat("lm_head.weight", 30, 41)
        with pytest.raises(ValueError, match="out must be"):
            r.read_flat("model.layers.0.input_layernorm.weight", 0, 4, out=buf)  # bfloat16 tensor, float buffer


def test_add_flat_slices_write_the_same_file_as_add(tmp_path: Path) -> None:
    tensors = small_model()
    names = sorted(tensors)
    layout = [(n, tuple(tensors[n].shape), tensors[n].dtype) for n in names]
    with ShardedWriter(tmp_path / "whole", max_shard_bytes=100, layout=layout) as w:
        for n in names:
            w.add(n, tensors[n])
    with ShardedWriter(tmp_path / "sliced", max_shard_bytes=100, layout=layout) as w:
        for n in names:
            flat = tensors[n].reshape(-1)
            for start in range(0, flat.numel(), 3):  # slices of 3 elements, the last one shorter
                w.add_flat(n, start, flat[start : start + 3])
    for file in w.files:
        assert (tmp_path / "sliced" / file).read_bytes() == (tmp_path / "whole" / file).read_bytes()


def test_add_flat_refuses_gaps_overlaps_and_an_unfinished_tensor(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path / "a", layout=[("x", (2, 3), torch.float32)])
    w.add_flat("x", 0, torch.zeros(2))
    with pytest.raises(ValueError, match=r"slice \[3, 4\)"):
        w.add_flat("x", 3, torch.zeros(1))  # a gap: elements 2 and 3 are not written yet
    with pytest.raises(ValueError, match=r"slice \[1, 2\)"):
        w.add_flat("x", 1, torch.zeros(1))  # an overlap
    with pytest.raises(ValueError, match="torch.float64"):
        w.add_flat("x", 2, torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="add\\(\\) after add_flat"):
        w.add("x", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="close\\(\\) before tensor 'x'"):
        w.close()
    w.add_flat("x", 2, torch.ones(4))
    w.close()
    with ShardedReader(tmp_path / "a") as r:
        assert r.get("x").tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="needs an open writer with a layout"):
        ShardedWriter(tmp_path / "b").add_flat("x", 0, torch.zeros(1))
