"""Shared fixtures: the embedded world (built once per cache), tiny local models, CLI runner.

Tests never touch the network: the world is generated locally, other architectures are built from configs.
`POSTTRAIN_CACHE` is honoured so CI and developers share one built world across runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tests train ~1M-parameter models, where torch's intra-op threads cost more than they gain, and pytest runs
# CLI subprocesses beside itself: two 2-thread torch processes on 2 cores ran 20x slower than 1-thread ones.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No eval is read from or written to the cross-run eval cache (evals/cache.py): tests stub lm-eval with made-up
# scores that must never be reused by a real run, and count the evals they expect. tests/test_eval_cache.py
# turns it on into a temporary folder.
os.environ["POSTTRAIN_EVAL_CACHE"] = "off"


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def world():
    """Path of the built world (data/, base/); built on first use, cached afterwards."""
    from posttrain.world import world_dir

    return world_dir()


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900):
    """Run `python -m posttrain ...` in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "posttrain", *args],
        cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


# ---- tiny Llamas for the merge and transfer tests: built from a config and a seed here, never fetched ----------

TINY_SPECIALS = ["<unk>", "<pad>", "<eos>", "<eot>"]
# The transfer tests' source vocabulary, and a target one with the words reordered, two added and one dropped (w9).
TINY_SOURCE_WORDS = TINY_SPECIALS + [f"w{i}" for i in range(12)]
TINY_TARGET_WORDS = TINY_SPECIALS + ["w3", "w1", "new_a", "w0", "w2", "w11", "w10", "new_b", "w4", "w5", "w6", "w7",
                                     "w8"]
TINY_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<eot>{% endfor %}"


def tiny_words(rows: int) -> list[str]:
    """TINY_SPECIALS then w0, w1, ... up to `rows` words."""
    return TINY_SPECIALS + [f"w{i}" for i in range(rows - len(TINY_SPECIALS))]


def tiny_tokenizer(words: list[str], eos: str = "<eos>", template: str | None = None):
    """A word-level fast tokenizer, one id per word in order, with <unk>, <pad> and `eos`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token=eos)
    if template:
        fast.chat_template = template
    return fast


def make_tiny_llama(folder: Path, words: list[str] | None = None, *, seed: int = 0, base: Path | None = None,
                    scale: float = 0.05, dtype=None, tokenizer=True, shard: str | None = None, **config) -> Path:
    """A tiny Llama (2 layers, hidden 16) in `folder`: fresh from `seed` with one embedding row per word, or
    `base` plus seeded noise of size `scale` (a fine-tune). `words` defaults to tiny_words(vocab_size, 64) (a
    fine-tune: its base's rows). `tokenizer`: True saves a tiny_tokenizer of the words, False none, else the
    tokenizer object to save; a fresh model's configs carry its eos and pad ids. `shard` is a max_shard_size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if base is None:
        words = words or tiny_words(config.pop("vocab_size", 64))
        tok = tiny_tokenizer(words) if isinstance(tokenizer, bool) else tokenizer
        kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
        model = LlamaForCausalLM(LlamaConfig(**{**kw, **config}, vocab_size=len(words), bos_token_id=None,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    else:
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        words = words or tiny_words(model.config.vocab_size)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    model.to(dtype or torch.float32).save_pretrained(folder, safe_serialization=True,
                                                     **({"max_shard_size": shard} if shard else {}))
    if tokenizer is not False:
        (tiny_tokenizer(words) if tokenizer is True else tokenizer).save_pretrained(folder)
    return folder


def load_tensors(folder: Path) -> dict:
    """Every tensor of a model folder, one file or shards."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def with_renamed_tensor(src: Path, dst: Path, name: str = "model.layers.1.mlp.gate_proj.weight") -> Path:
    """A copy of a one-file model folder in which tensor `name` is called `<name without .weight>.extra`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[name.removesuffix(".weight") + ".extra"] = tensors.pop(name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def with_architecture(src: Path, dst: Path, model_type: str = "mistral", arch: str = "MistralForCausalLM") -> Path:
    """A copy of a model folder whose config.json names another architecture (the weights are unchanged)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=[arch])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="session")
def merge_trio(tmp_path_factory):
    """A tiny base (with tokenizer) and two fine-tunes of it: (base, a, b)."""
    root = tmp_path_factory.mktemp("merge_trio")
    base = make_tiny_llama(root / "base", seed=0)
    return base, make_tiny_llama(root / "a", seed=1, base=base), make_tiny_llama(root / "b", seed=2, base=base)


@pytest.fixture(scope="session")
def transfer_models(tmp_path_factory):
    """Tiny models for a transfer: source base `sb`, its fine-tune `sf` (chat template, eos <eot>), a target
    `tgt` with another vocabulary (TINY_TARGET_WORDS, sharded), and `same`: a target with the source's vocabulary."""
    root = tmp_path_factory.mktemp("transfer")
    sb = make_tiny_llama(root / "sb", TINY_SOURCE_WORDS, seed=0)
    sf = make_tiny_llama(root / "sf", TINY_SOURCE_WORDS, base=sb, seed=1,
                         tokenizer=tiny_tokenizer(TINY_SOURCE_WORDS, eos="<eot>", template=TINY_TEMPLATE))
    tgt = make_tiny_llama(root / "tgt", TINY_TARGET_WORDS, seed=2, shard="8KB")
    same = make_tiny_llama(root / "same", TINY_SOURCE_WORDS, base=sb, seed=3, scale=0.5)
    return {"sb": sb, "sf": sf, "tgt": tgt, "same": same}
