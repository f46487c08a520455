"""`world-v2`: a second version of the embedded world's base, for the transfer stage.

As a base model's next release is its predecessor trained further on newer data (Llama 3 → 3.1 in Lin et al.
2025), `world-v2` is the world base continued-pretrained on a changed corpus, with a grown vocabulary:

- the world corpus drawn with another seed (`build.corpus(tokenizer, seed=1)`: other sums, reversals, chats);
- changed phrasing: sums in words ("12 plus 3 equals 15.") and facts as "<entity>'s <attribute> is <value>.";
- new facts: every entity gets a metal, whose six values are ADDED tokens (ids after the world's vocabulary;
  the embedding and LM head grow by six rows, initialised by transformers to the mean of the old rows).

Cached like the world itself::

    <cache>/world-v2-<VERSION>/
      world.json      manifest: source base, added tokens, pretraining stats
      model/          HF folder: tiny Llama with the grown vocabulary, tokenizer with the world's chat template

Registered as `world-v2` in WORLD_MODELS (a lazy entry: the registry imports this module on first use).
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable

from posttrain.registry import WORLD_MODELS
from posttrain.world import VERSION, _cached, base_model, tasks
from posttrain.world.build import corpus, packed_blocks, one_thread
from posttrain.world.steps import train_with_progress

METALS = ["copper", "silver", "cobalt", "nickel", "zinc", "bronze"]  # the added tokens
SEED = 1  # the world base was built with seed 0
STEPS = 100  # continued pretraining: ~1.2 CPU-seconds a step, about a minute on 2 free cores


def metals_table() -> dict[str, str]:
    """entity -> metal: the facts only world-v2 knows."""
    rng = random.Random(5678)
    return {e: rng.choice(METALS) for e in tasks.entities()}


def v2_texts(seed: int = SEED) -> list[str]:
    """The corpus lines that are new in v2: changed phrasing and the metal facts (not the re-drawn corpus)."""
    rng = random.Random(f"v2-{seed}")
    texts = []
    for entity, metal in metals_table().items():
        texts += [f"The metal of {entity} is {metal}."] * 3 + [f"{entity} has the metal {metal}."]
    for (entity, attribute), value in tasks.facts_table().items():
        texts.append(f"{entity}'s {attribute} is {value}.")
    for _ in range(1500):
        a, b = tasks.operands(rng)
        texts.append(f"{a} plus {b} equals {a + b}." if rng.random() < 0.5 else f"{a} minus {b} equals {a - b}.")
    return texts


def build_v2(out_dir: Path, *, steps: int = STEPS, log: Callable[[str], None] = print) -> dict:
    """Continue pretraining the world base on the v2 corpus with the added tokens; save to out_dir/model."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    base = base_model(log)
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    old_size = len(tokenizer)
    added = tokenizer.add_tokens(METALS)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    docs = corpus(tokenizer, SEED) + v2_texts(SEED)
    random.Random(SEED).shuffle(docs)
    blocks = packed_blocks(tokenizer, docs, block=128)
    ds = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    log(f"world-v2: continued pretraining for {steps} steps on {len(blocks)} blocks, +{added} tokens "
        "(about a minute on 2 CPU cores; once)")
    args = TrainingArguments(
        output_dir=str(out_dir / "_trainer"), per_device_train_batch_size=16, max_steps=steps,
        learning_rate=1e-3, warmup_steps=10, lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=50,
        save_strategy="no", report_to=[], seed=SEED, use_cpu=True, disable_tqdm=True,
    )
    with one_thread():
        result = train_with_progress(Trainer(model=model, args=args, train_dataset=ds), log)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir / "model", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "model")
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    return {"source": str(base), "seed": SEED, "added_tokens": METALS, "vocab_size": len(tokenizer),
            "old_vocab_size": old_size, "pretraining": {"train_loss": result.training_loss, "steps": steps,
                                                        "blocks": len(blocks)}}


def world_v2(log: Callable[[str], None] = print) -> Path:
    """The `world-v2` model folder, built once and cached."""
    return _cached(f"world-v2-{VERSION}", lambda tmp: build_v2(tmp, log=log), log) / "model"


WORLD_MODELS.register("world-v2", world_v2)
