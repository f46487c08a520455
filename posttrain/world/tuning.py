"""The embedded world's tuned trainer settings, one complete `trainer:` block per trainable stage kind.

The stage classes' defaults are for real models (TRL's values); the world (a 1M-parameter Llama on 2 CPU
cores) trains with these instead. They are stated, not defaulted, by every world config: configs/stages/,
the world pipelines under configs/pipelines/ (claims and experiments included), the cached world models of
posttrain/world/trained.py, and the tests and benchmarks that train on the world. tests/test_defaults.py
checks that each world config resolves to the block of its kind here (plus the few fields a config changes
on purpose), so a world stage that forgets its block, or a class default that changes under one, fails a
test instead of silently retraining the world with real-model settings.

Every field of TrainerConfig is listed, so a later change of a class default cannot leak into the world.
"""
from __future__ import annotations

from typing import Any

WORLD_TRAINERS: dict[str, dict[str, Any]] = {
    # 800 steps at a high learning rate take world v3's base from 1% to 95% on arithmetic (400 steps: 17%) in
    # ~40 s on one CPU thread.
    "sft": dict(
        learning_rate=2e-3, max_steps=800, num_train_epochs=1.0, per_device_train_batch_size=32,
        gradient_accumulation_steps=1, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=20, save_steps=100, save_total_limit=2, max_length=128,
        gradient_checkpointing=False, bf16=None, seed=None, extra={},
    ),
    # Tuned on world-sft (about a minute of training). Plain SGD, not AdamW: Adam moves every weight that has
    # any gradient by about lr per step, and the world's arithmetic, which the style pairs never show, is
    # fragile; at equal style gain AdamW runs cost world-sft 30+ points of arithmetic, SGD (with gradient
    # clipping, so a step's L2 norm is at most lr) about 15. docs/notes/dpo_world_tuning.md has the table.
    "dpo": dict(
        learning_rate=0.2, max_steps=40, num_train_epochs=1.0, per_device_train_batch_size=16,
        gradient_accumulation_steps=1, lr_scheduler_type="cosine", warmup_steps=3, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=5, save_steps=20, save_total_limit=2, max_length=96,
        gradient_checkpointing=False, bf16=None, seed=None, extra={"optim": "sgd"},
    ),
    # Tuned on world-sft (~2-3 min on 2 CPUs): 64 completions a step = 8 prompts x 8 samples. At 2e-4 the
    # policy collapsed (reward and greedy accuracy fell); 5e-5, constant, no KL, lifted both. Fewer prompts a
    # step (4) made the reward curve too noisy to show the gain within 60 steps.
    "grpo": dict(
        learning_rate=5e-5, max_steps=60, num_train_epochs=1.0, per_device_train_batch_size=64,
        gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=2, save_steps=50, save_total_limit=2, max_length=None,
        gradient_checkpointing=False, bf16=None, seed=None, extra={},
    ),
}

# Stage fields besides `trainer:` that the world tunes, by kind. DPO: RPO's NLL term on the chosen answer
# (Pang et al. 2024), without which plain DPO on the world pushes the bare answers down and never makes
# "Certainly!" the greedy opening (style 0 after 60 steps). GRPO: the world's answers are a few tokens long.
WORLD_STAGE_FIELDS: dict[str, dict[str, Any]] = {
    "sft": {},
    "dpo": {"rpo_alpha": 0.5},
    "grpo": {"max_completion_length": 8},
}


def world_trainer(kind: str, **fields: Any) -> dict[str, Any]:
    """A copy of the world's trainer block for `kind`, with `fields` changed (`extra` is replaced whole)."""
    return {**WORLD_TRAINERS[kind], "extra": dict(WORLD_TRAINERS[kind]["extra"]), **fields}
