"""Build the embedded world's tokenizer and tiny base model, deterministically, on 2 CPU cores.

The tokenizer is a byte-level BPE trained with `tokenizers`; digits are split one per token (as in Llama and
Qwen tokenizers) so that arithmetic is learnable by a small model. The model is a tiny Llama-architecture
network pretrained briefly with transformers' Trainer on the generated corpus of `tasks.pretraining_texts`.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path

import torch

from posttrain.world import tasks
from posttrain.world.steps import Steps, train_with_progress

# Seconds each build step takes on 2 shared CPU cores (the ETA the build prints): the whole build took 146 s
# (world.json's build_seconds) while other jobs ran; the pretraining is nearly all of it.
BUILD_SECONDS = {"task data": 2, "tokenizer": 5, "pretraining the base": 140}

SPECIAL = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

# Assistant turns sit inside {% generation %} so TRL's assistant_only_loss masks everything else; the
# end-of-turn token is inside the block so the model learns to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|end|>",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def corpus(tokenizer, seed: int) -> list[str]:
    docs = tasks.pretraining_texts(seed)
    docs += [tokenizer.apply_chat_template(c, tokenize=False) for c in tasks.pretraining_chats(seed)]
    random.Random(seed).shuffle(docs)
    return docs


def packed_blocks(tokenizer, docs: list[str], block: int) -> list[list[int]]:
    """Concatenate documents (each ended by EOS) and cut into fixed blocks, as in HF's run_clm example."""
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]
    return [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]


def build_base(out_dir: Path, tokenizer, *, seed: int = 0, epochs: int = 16, log=print) -> dict:
    """Pretrain the tiny Llama on the world corpus and save it as an HF folder; returns training stats."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    set_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    blocks = packed_blocks(tokenizer, corpus(tokenizer, seed), block=128)
    ds = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    log(f"world: pretraining {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on {len(blocks)} blocks")
    args = TrainingArguments(
        output_dir=str(out_dir.parent / "_trainer"),  # outside the model folder: nothing of it is kept
        per_device_train_batch_size=16,
        num_train_epochs=epochs,
        learning_rate=3e-3,
        warmup_steps=30,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        disable_tqdm=True,  # train_with_progress prints a line at every tenth instead
    )
    result = train_with_progress(Trainer(model=model, args=args, train_dataset=ds), log)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(out_dir.parent / "_trainer", ignore_errors=True)
    return {"train_loss": result.training_loss, "steps": result.global_step, "blocks": len(blocks)}


def write_data(data_dir: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    counts = {}
    for task in tasks.TASKS:
        counts[task] = {}
        for split, rows in tasks.make_splits(task, seed).items():
            path = data_dir / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            counts[task][split] = len(rows)
    return counts


@contextlib.contextmanager
def one_thread():
    """Train the world's models on one torch thread: on a 128-wide model intra-op threading costs more than it
    gains (measured on 2 cores: 6 steps/s with one thread; with two, 1-4 s a step while another torch process
    ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_world(out_dir: Path, *, seed: int = 0, log=print) -> dict:
    """Write data/, tokenizer and base/ into out_dir (a fresh temporary folder); return the manifest."""
    steps = Steps("world", BUILD_SECONDS, log)
    steps.step("task data")
    counts = write_data(out_dir / "data", seed)
    steps.step("tokenizer")
    texts = tasks.pretraining_texts(seed) + [
        m["content"] for c in tasks.pretraining_chats(seed) for m in c
    ]
    tokenizer = build_tokenizer(texts)
    steps.step("pretraining the base")
    with one_thread():
        stats = build_base(out_dir / "base", tokenizer, seed=seed, log=log)
    steps.done()
    return {"seed": seed, "data": counts, "pretraining": stats, "vocab_size": len(tokenizer)}
