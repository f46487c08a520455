"""Tiny random models of the common architectures, built locally from transformers' config classes.

Every model shares the world's tokenizer (`posttrain.world`, 512 tokens, a chat template with generation
markers), so SFT, DPO, GRPO and the world's eval tasks run on any of them; the architecture is the only
difference. Hidden 32, 2 layers, 4 heads: each model has ~50k parameters and loads in milliseconds.
Nothing is fetched: no hub, no network.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

# name -> (config class name in transformers, its fields beyond the shared shape). Real models' choices are kept
# where they matter to posttrain: which ones tie the embedding (GPT-2, Qwen2 small, Gemma), fused projections
# (Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's query_key_value, GPT-2's c_attn Conv1D), MoE experts.
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 8, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "query_pre_attn_scalar": 8, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "gpt2": ("GPT2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {"tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", {"tie_word_embeddings": False}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 32, "tie_word_embeddings": False}),
}

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
# GPT-2 names the same shape its own way and has no grouped-query attention.
GPT2_SHAPE = dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=256)


def world_tokenizer():
    """The world's tokenizer (byte-level BPE, chat template with {% generation %} markers)."""
    from transformers import AutoTokenizer

    from posttrain.world import base_model

    return AutoTokenizer.from_pretrained(base_model(lambda m: None))


def make_tiny(arch: str, folder: Path, tokenizer=None, *, seed: int = 0, dtype=None, **config: Any) -> Path:
    """Save a tiny random `arch` model (a key of ARCHS) with `tokenizer` (default: the world's) in `folder`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    tok = tokenizer or world_tokenizer()
    cls_name, own = ARCHS[arch]
    shape = GPT2_SHAPE if arch == "gpt2" else SHAPE
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    cfg = getattr(transformers, cls_name)(**{**shape, **own, **ids, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(dtype or torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def headers(folder: Path) -> dict[str, dict]:
    """name -> safetensors header entry (dtype, shape, data_offsets) of every tensor, one file or shards."""
    out: dict[str, dict] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            out.update({k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"})
    return out


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    """name -> the raw stored bytes of every tensor (a byte-identity check, not a value check)."""
    out: dict[str, bytes] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        for k, v in json.loads(raw[8:8 + n]).items():
            if k != "__metadata__":
                out[k] = raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]
    return out


def disk_sources(folder: Path) -> dict[str, set[str]]:
    """{tensor name on disk: the names of the parameters it is saved from} for the model in `folder`.

    transformers 5 converts some checkpoints at load and back at save (GPT-NeoX's `embed_out` is the parameter
    `lm_head`, Qwen2-MoE's per-expert tensors are fused into one parameter per layer), so a parameter and a
    tensor on disk are not always one name. Found by saving a copy whose parameter i is filled with the value
    i + 1 (exact in float32): each tensor on disk holds the values of the parameters it came from.
    """
    import tempfile

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            p.fill_(i + 1)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = {}
        for f in Path(tmp).glob("*.safetensors"):
            saved.update(load_file(str(f)))
    return {k: {names[int(v) - 1] for v in t.unique().tolist()} for k, t in saved.items()}
