"""Real size on CPU (issue 17): the train and merge figures again, on a model of Qwen2.5-0.5B's published shape.

The model is Qwen2ForCausalLM with the published config (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151,936, tied embeddings: 494M parameters), randomly initialised here, with the
embedded world's tokenizer and chat template (512 tokens: the rest of the vocabulary is never seen, which
changes no cost, since embedding, logits and optimizer cover all 151,936 rows anyway). Nothing comes from a hub.
It is stored in bfloat16, as the published checkpoint is, so posttrain treats it as it would the real one:
the stages load it in float32 on CPU (models.load_model), train in float32 and write the result back in
bfloat16; the merge stage does its math in float32 and writes bfloat16. It is built once into
`$POSTTRAIN_CACHE/bench-qwen2.5-0.5b-<VERSION>/` (base/, and ft1/ ft2/ = base + N(0, 0.002) noise for the
merge), about 3 GB, and reused by every later bench.

Figures (`--only real`), each from benchmarks/train.py and benchmarks/merge.py unchanged in method:
  * sft and dpo: s/step and whole stage vs plain TRL, and the stage's peak RSS against plain TRL's x 1.10.
    The trainer block is the stage kind's class defaults (a real user's: AdamW, gradient checkpointing, the
    end-of-training checkpoint with its optimizer state) with few steps and short rows (TRAINER);
  * merge task arithmetic of the three folders: vs raw read+write, vs mergekit's CLI, peak RSS.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import Figure, bench_env, measured, python

VERSION = "1"  # bump when the shape, dtype, seed or tokenizer of the cached folders changes
KEY = f"bench-qwen2.5-0.5b-{VERSION}"
DTYPE = "bfloat16"
# Qwen2.5-0.5B's config.json as published (token ids aside: the world tokenizer's are used).
QWEN25_05B: dict[str, Any] = dict(
    hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, hidden_act="silu",
    max_position_embeddings=32768, max_window_layers=24, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    use_sliding_window=False, attention_dropout=0.0, initializer_range=0.02,
)
# Few steps, short rows: a step of the 494M model takes seconds on one thread (a DPO step, policy and reference
# on chosen and rejected, about three SFT steps' worth), and the group must stay a few minutes on 2 cores.
# save_steps above max_steps: transformers still writes the final checkpoint (with AdamW's state) on both sides.
STEPS = {"sft": 2, "dpo": 2}
TRAINER = {"sft": dict(per_device_train_batch_size=2, max_length=64, logging_steps=1, save_steps=500),
           "dpo": dict(per_device_train_batch_size=1, max_length=64, logging_steps=1, save_steps=500)}
MERGE_METHODS = ["task_arithmetic"]
SHARD_BYTES = 5_000_000_000  # transformers' default: one 988 MB file, as published
NOISE = 0.002  # the fine-tunes' task vectors, as in merge_data (10x below the init's 0.02)


def build(out: Path, seed: int = 0, log: Callable[[str], None] = print, **override: Any) -> dict[str, Any]:
    """Write out/base (HF folder: config, bf16 weights, tokenizer) and out/ft1, out/ft2 (base + noise).

    `override` changes config fields (tests build a tiny model of the same architecture this way)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from posttrain.models import save_model_folder
    from posttrain.world import base_model

    tokenizer = AutoTokenizer.from_pretrained(str(base_model(log)))
    config = Qwen2Config(**{**QWEN25_05B, **override}, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    save_model_folder(model, tokenizer, out / "base", DTYPE)
    del model
    _finetunes(out, seed)
    return {"seed": seed, "params": params, "dtype": DTYPE, "config": {**QWEN25_05B, **override}}


def _finetunes(out: Path, seed: int) -> None:
    """ft1, ft2: copies of base (same files, same tensor layout) with N(0, NOISE) added to every weight."""
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed + 1)
    base = out / "base"
    for name in ("ft1", "ft2"):
        shutil.copytree(base, out / name, ignore=shutil.ignore_patterns("*.safetensors"))
        for f in sorted(base.glob("*.safetensors")):
            tensors = load_file(str(f))
            for k, t in tensors.items():
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * NOISE
                tensors[k] = (t.float() + noise).to(t.dtype)
                del noise
            save_file(tensors, str(out / name / f.name), metadata={"format": "pt"})
            del tensors


def model_root(log: Callable[[str], None] = print) -> Path:
    """The cached folders, built on first use (under the world cache's lock, renamed into place when done)."""
    from posttrain.world import _cached

    return _cached(KEY, lambda tmp: build(tmp, log=log), log)


def figures(runs: int, quick: bool = False) -> list[Figure]:
    from benchmarks import merge, train

    # Built (first time only) in a child process, so the bench itself never holds the 2 GB float32 model.
    _, stdout, _ = measured([python(), "-m", "benchmarks.real"], bench_env(OMP_NUM_THREADS="2"), timeout=1800)
    root = Path(stdout.strip().splitlines()[-1])
    label = "real 0.5B"
    steps = {k: 1 if quick else n for k, n in STEPS.items()}
    out: list[Figure] = []
    for kind in ("sft", "dpo"):
        trainer = train.class_trainer(kind, steps[kind], **TRAINER[kind])
        out += train.figures(kind, steps[kind], runs, model=str(root / "base"), trainer=trainer,
                             label=f"{label} {kind}", rss=True)
    inputs = [root / n for n in ("base", "ft1", "ft2")]
    out += merge.compare(inputs, SHARD_BYTES, MERGE_METHODS, MERGE_METHODS, runs, label=f"{label} merge",
                         size="3 x Qwen2.5-0.5B shape, 0.99 GB each, bfloat16", dtype=DTYPE)
    return out


if __name__ == "__main__":
    print(model_root())
