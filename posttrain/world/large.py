"""`world-large`: a second, larger world base (8.6M parameters) for the claims only (issue 23).

Claim 4 (TIES / DARE / Breadcrumbs keep more of each specialist than averaging) cannot show on the 1M world:
there, exact-match skill is far from linear in the task vector (docs: configs/pipelines/experiments/
merge_regime.yaml), so every merge of two specialists keeps neither skill. The merging papers' interference
arguments assume a model wide enough that a task lives in a small update; `world-large` is the same world
(tokenizer, chat template, pretraining corpus: `build.corpus(tokenizer, seed=0)` packed as the base's is) in
a Llama 8.6x the size, pretrained from scratch once and cached::

    <cache>/world-large-<VERSION>-<8 hex of the recipe>/
      world.json      manifest: shape, parameter count, pretraining stats, build_seconds
      model/          HF folder: the 8.6M Llama, the world's tokenizer with its chat template

Only `make claims` (configs/pipelines/claims/merge_methods.yaml) builds it; the test suite never does (it checks
the shape and the registration under `only_built()`). Registered as `world-large` in WORLD_MODELS (a lazy entry).
Measurements: docs/notes/world_large.md.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from posttrain.registry import WORLD_MODELS
from posttrain.rundir import sha256_json
from posttrain.world import VERSION, _cached, base_model
from posttrain.world.build import MODEL_SHAPE, corpus, packed_blocks
from posttrain.world.steps import train_with_progress

# 384 wide, 4 layers, 6 heads of 64, MLP 1280: 8.6M parameters (the world's 1.0M x 8.6), every layer wider
# than the 1M world's whole model (128), which is what the merge claims need. Measured on this machine (2 shared
# cores, 128-token blocks, AdamW, one thread): 384/1024/6 (11.0M) 1.98 s a batch of 16 on a quiet machine, 2.0 s
# a batch of 8 beside another session's run; 384/1280/4 1.5 s a batch of 8 there.
SHAPE = {**MODEL_SHAPE, "hidden_size": 384, "intermediate_size": 1280, "num_hidden_layers": 4,
         "num_attention_heads": 6, "num_key_value_heads": 6}
SEED = 0  # the world base's seed: the same corpus draw
# 10 epochs of the corpus's 509 blocks in batches of 8 (640 steps) at lr 1e-3: built in 489 s (world.json's
# build_seconds, beside other sessions' runs). Full test splits, 2026-12-05, world-large / the 1M world:
# arithmetic 0.050 / 0.030, facts 0.80 / 0.90 (difference within 2 stderr), verifiable 0.030 / 0.035, reversal
# and style 0 / 0. The same recipe at the 1M world's lr 3e-3 underfit its corpus (loss 1.13 against the 1M
# world's 0.93; facts 0.28); at 1e-3 its corpus loss is 0.95. docs/notes/world_large.md has every build.
EPOCHS = 10
BATCH = 8
LEARNING_RATE = 1e-3  # the 1M world's 3e-3 x 128/384 (its width over ours), as muP scales Adam's rate
# One torch thread, as the 1M world (build.one_thread): two are 1.7x faster on a quiet machine, but beside two
# other sessions' pipelines (load ~5 on 2 cores) two threads ran 6.8 s a step, one thread ~2.5.
THREADS = 1


def model_config(tokenizer_size: int = 512, **ids: int):
    """The LlamaConfig of world-large (for the world's 512-token vocabulary unless told)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=tokenizer_size, **ids, **SHAPE)


def n_params(config=None) -> int:
    """Parameters of world-large's model, counted on a meta-device instance (nothing is allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(model_config() if config is None else config)
    return sum(p.numel() for p in model.parameters())


def build_large(out_dir: Path, *, epochs: int = EPOCHS, log: Callable[[str], None] = print) -> dict:
    """Pretrain world-large on the world corpus with the world's tokenizer; save it to out_dir/model."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    base = base_model(log)
    tokenizer = AutoTokenizer.from_pretrained(str(base))  # the world's tokenizer and chat template, unchanged
    set_seed(SEED)
    config = model_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    blocks = packed_blocks(tokenizer, corpus(tokenizer, SEED), block=128)
    ds = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    params = sum(p.numel() for p in model.parameters())
    log(f"world-large: pretraining {params / 1e6:.1f}M params for {epochs} epochs of {len(blocks)} blocks "
        "(about 4-10 minutes on 2 shared CPU cores; once)")
    args = TrainingArguments(
        output_dir=str(out_dir / "_trainer"), per_device_train_batch_size=BATCH, num_train_epochs=epochs,
        learning_rate=LEARNING_RATE, warmup_steps=30, lr_scheduler_type="cosine", weight_decay=0.0,
        logging_steps=20, save_strategy="no", report_to=[], seed=SEED, use_cpu=True, disable_tqdm=True,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        result = train_with_progress(Trainer(model=model, args=args, train_dataset=ds), log)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir / "model", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "model")
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    return {"source_tokenizer": str(base), "seed": SEED, "shape": SHAPE, "params": params,
            "pretraining": {"train_loss": result.training_loss, "steps": result.global_step, "blocks": len(blocks),
                            "epochs": epochs, "batch": BATCH, "learning_rate": LEARNING_RATE, "threads": THREADS}}


def cache_key() -> str:
    """`world-large-<world VERSION>-<8 hex>`: the hex hashes the recipe (shape, epochs, batch, rate, threads), so
    a changed recipe builds a new model instead of reusing the old one (as world/trained.py's keys do)."""
    recipe = {"shape": SHAPE, "seed": SEED, "epochs": EPOCHS, "batch": BATCH, "lr": LEARNING_RATE, "threads": THREADS}
    return f"world-large-{VERSION}-{sha256_json(recipe)[:8]}"


def world_large(log: Callable[[str], None] = print) -> Path:
    """The `world-large` model folder, built once and cached (build_seconds in its world.json)."""
    return _cached(cache_key(), lambda tmp: build_large(tmp, log=log), log) / "model"


WORLD_MODELS.register("world-large", world_large)
