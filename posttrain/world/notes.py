"""What the embedded world can and cannot show, said in a demo's output where its figures could mislead.

The world is a 1M-parameter Llama on five toy tasks: small enough to train on 2 CPU cores in minutes, too
small for some effects real post-training shows. A stage whose models are all world models logs its note
(`log_note`), so a reader of `make stage=merge` learns why one merge keeps both skills and another keeps
nothing, without reading docs/.
"""
from __future__ import annotations

from typing import Callable

from posttrain.registry import WORLD_MODELS

NOTES: dict[str, list[str]] = {
    "merge": [
        "world note: the world CAN show task arithmetic (Ilharco et al. 2023) keeping what each specialist learned "
        "when the task vectors are small and start from one model: world-dpo-style and world-grpo-verifiable each "
        "moved world-sft a little (SGD steps; GRPO at lr 5e-5), and their sum, added whole (weights 1.0), keeps "
        "most of each one's gain and world-sft's arithmetic. Compare the merge's row with the input:<specialist> "
        "rows of the report.",
        "world note: it CANNOT show merges of specialists fine-tuned far from their base: world-sft-arithmetic "
        "and world-sft-reversal (800 steps at lr 2e-3 from the world base) rewrite most of a 1M-parameter model, "
        "their task vectors collide, and TIES of the two kept 0.01 of 0.95 arithmetic and 0.00 of 0.70 reversal "
        "(issue 18). Nor can it show averaging: exact match is far from linear in a task vector here (half of one "
        "specialist's vector kept 0.09 of its 0.79 arithmetic: configs/pipelines/experiments/merge_regime.yaml), "
        "so merge methods do not rank here as they rank on real models, where merging gains room with model size "
        "(Yadav et al. 2024, 'What Matters for Model Merging at Scale').",
    ],
}


def is_world_ref(ref: str | None) -> bool:
    """A named world model (`world`, `world-sft`, `world-v2`, ...), not a folder, hub name or stage output."""
    return bool(ref) and ref in WORLD_MODELS


def log_note(kind: str, refs: list[str | None], log: Callable[[str], None]) -> None:
    """Log the world's note for stage kind `kind` when every model it reads (`refs`; None entries skipped)
    is a world model; nothing otherwise."""
    refs = [r for r in refs if r is not None]
    if kind in NOTES and refs and all(is_world_ref(r) for r in refs):
        for line in NOTES[kind]:
            log(line)
