"""Three synthetic Llama-shaped models for the merge figures: a base and two "fine-tunes" (base + noise).

Written straight to sharded safetensors with a `config.json` that mergekit and transformers accept, without
ever building a model (a 1 GB model through transformers would cost a minute and twice the memory). The
default shape is 16 layers of width 1024 and a 32,000-token vocabulary, untied: 271M float32 parameters,
1.09 GB per model, five 256 MB shards; the largest tensor is the embedding, 131 MB.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.tensor_writer import ShardedWriter


@dataclass(frozen=True)
class Shape:
    layers: int = 16
    hidden: int = 1024
    intermediate: int = 2816
    vocab: int = 32000
    shard_bytes: int = 256 * 2**20

    def tensors(self) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden, self.intermediate
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            for proj in ("q", "k", "v", "o"):
                out[f"{p}self_attn.{proj}_proj.weight"] = (h, h)
            out[f"{p}mlp.gate_proj.weight"] = (i, h)
            out[f"{p}mlp.up_proj.weight"] = (i, h)
            out[f"{p}mlp.down_proj.weight"] = (h, i)
            out[f"{p}input_layernorm.weight"] = (h,)
            out[f"{p}post_attention_layernorm.weight"] = (h,)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out

    def nbytes(self) -> int:
        return sum(4 * math.prod(s) for s in self.tensors().values())

    def largest_bytes(self) -> int:
        return max(4 * math.prod(s) for s in self.tensors().values())

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": self.vocab,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "hidden_act": "silu", "dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}


QUICK = Shape(layers=2, hidden=256, intermediate=704, vocab=4000, shard_bytes=2 * 2**20)


def write_models(root: Path, shape: Shape, seed: int = 0) -> list[Path]:
    """root/{base,ft1,ft2}: base ~ N(0, 0.02), ft_i = base + N(0, 0.002) (a task vector 10x smaller)."""
    folders = [root / n for n in ("base", "ft1", "ft2")]
    gen = torch.Generator().manual_seed(seed)
    writers = [ShardedWriter(f, max_shard_bytes=shape.shard_bytes) for f in folders]
    for name, dims in shape.tensors().items():
        base = torch.randn(dims, generator=gen) * 0.02
        if name.endswith("norm.weight"):
            base += 1.0
        writers[0].add(name, base)
        for w in writers[1:]:
            w.add(name, base + torch.randn(dims, generator=gen) * 0.002)
        del base
    for w, f in zip(writers, folders):
        w.close()
        (f / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    return folders
