"""Real-model recipes (configs/recipes/) against their sources: every hyperparameter of every stage, resolved.

Each stage's resolved hyperparameters are compared field by field with a table of its source's values, every
entry (value, where it comes from). A stage's table must name every field of its view (`_view`), so no class
default can leak into a recipe unseen: a field the source does not fix is marked "ours" with the reason.
TÜLU 3's values are read from the paper and from open-instruct's commands for it (docs/tulu3.md) and its
trainers' defaults; the scaled learning rates follow the rule the recipes state.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

import posttrain.stages  # noqa: F401  (registers the stage kinds)
from posttrain.config import load_pipeline

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))

T3 = "TÜLU 3 (Lambert et al. 2024, arXiv 2411.15124)"
OI_SFT = "open-instruct docs/tulu3.md, the Llama-3.1-Tulu-3-8B-SFT command"
OI_DPO = "open-instruct docs/tulu3.md, the Llama-3.1-Tulu-3-8B-DPO command"
OI_RLVR = "open-instruct docs/tulu3.md, the Llama-3.1-Tulu-3-8B (RLVR) command"
OI_PPO = "open-instruct open_instruct/ppo_vllm_thread_ray_gtrl.py (the RLVR trainer)"
TIES = "TIES-Merging (Yadav et al. 2023, arXiv 2306.01708)"
FTT = "Fine-tuning transfer (Lin et al. 2025, 'Efficient Model Development through Fine-tuning Transfer')"
ADAMW = "AdamW: TRL's adamw_torch_fused with torch's betas and eps, as open-instruct's torch AdamW"
CLIP = "ours: TRL's 1.0 (open-instruct leaves clipping to DeepSpeed's `gradient_clipping: auto`)"
FULL = "full fine-tuning (open-instruct --use_lora False)"

# TÜLU 3 lowers the SFT and DPO learning rates 2.5x from 8B to 70B (5e-6 -> 2e-6; docs/tulu3.md's 70B command):
# lr ∝ N^-k over Llama 3.1 8.0B -> 70.6B parameters. The recipes extend that power law to their model's size
# and round to two significant digits.
K = math.log(5e-6 / 2e-6) / math.log(70.6 / 8.0)


def scaled(lr_8b: float, billions: float):
    return pytest.approx(lr_8b * (8.0 / billions) ** K, rel=0.05)


def warmup(ratio: float, rows: int, epochs: int, batch: int = 128) -> int:
    """open-instruct's warmup: int(ratio × optimizer steps), the steps of `epochs` passes over `rows` rows."""
    return int(ratio * epochs * math.ceil(rows / batch))


# Fields that do not change what is learned, left out of the comparison: how often to log and checkpoint, how
# many checkpoints to keep, the precision the GPU picks (bf16 when supported, as TÜLU 3 trains), activation
# checkpointing (memory only) and the seed (the pipeline's).
BOOKKEEPING = {"logging_steps", "save_steps", "save_total_limit", "bf16", "gradient_checkpointing", "seed"}
STAGE_FIELDS = {
    "sft": ["assistant_only_loss", "lora"],
    "dpo": ["loss_type", "beta", "rpo_alpha", "loss_weights", "max_prompt_length", "lora", "rehearsal"],
    "grpo": ["num_generations", "beta", "loss_type", "epsilon", "max_completion_length", "temperature", "lora"],
    "kto": ["loss_type", "beta", "desirable_weight", "undesirable_weight", "lora"],
    "orpo": ["beta", "lora"],
    "simpo": ["beta", "gamma_beta_ratio", "cpo_alpha", "label_smoothing", "lora"],
    "reward": ["center_rewards_coefficient", "lora"],
    "rloo": ["num_generations", "beta", "epsilon", "max_completion_length", "temperature", "normalize_advantages",
             "lora"],
    "merge": ["method", "params", "per_block", "search", "dtype"],
    "transfer": ["scale", "per_block", "search", "tokenizer_from", "dtype"],
}

# Stage fields that are not hyperparameters (inputs, data and replay of earlier data, evaluation, safety switches,
# output layout, batch layout: packing puts loss on the same tokens), or are checked in tests/test_recipes.py
# (rewards; `trainable`, the HFT variant's one difference).
NOT_COMPARED = {"name", "kind", "model", "data", "trains_on", "trust_remote_code", "allow_pickle", "trainer",
                "rewards", "rollout", "trainable", "base", "models", "max_shard_bytes", "seed", "source_base",
                "source_finetuned", "target_base", "replay", "report_to", "packing", "padding_free"}


def test_every_stage_field_is_compared_or_named_as_not_compared():
    """A field added to a stage class must join a view (and every table) or this list, not slip past both."""
    from posttrain.registry import STAGES

    assert set(STAGE_FIELDS) == set(STAGES.names())
    for kind, fields in STAGE_FIELDS.items():
        assert set(STAGES.get(kind).config.model_fields) - NOT_COMPARED == set(fields), kind


def _view(stage) -> dict:
    """The stage's hyperparameters: trainer fields (batch as one effective number) and the kind's own fields."""
    view = {k: getattr(stage, k) for k in STAGE_FIELDS[stage.kind]}
    if stage.kind == "merge":
        view["weights"] = [m.weight for m in stage.models]
    trainer = getattr(stage, "trainer", None)
    if trainer is not None:
        t = trainer.model_dump()
        for k in BOOKKEEPING | {"per_device_train_batch_size", "gradient_accumulation_steps"}:
            t.pop(k)
        # On one process; with N, the recipes say to divide gradient_accumulation_steps by N.
        view |= t | {"effective_batch": trainer.per_device_train_batch_size * trainer.gradient_accumulation_steps}
    return view


def tulu3_sft(params_b: float, epochs=(2, T3 + " / " + OI_SFT + ": 2 epochs"), rows: int = 939_344) -> dict:
    n, why = epochs
    return {
        "learning_rate": (scaled(5e-6, params_b), f"{OI_SFT}: 5e-6 at 8B, scaled by the 8B -> 70B power law"),
        "max_steps": (-1, "epochs decide"),
        "num_train_epochs": (n, why),
        "effective_batch": (128, f"{T3}: effective SFT batch 128 ({OI_SFT}: 64 GPUs × 1 × 2)"),
        "lr_scheduler_type": ("linear", f"{OI_SFT}: --lr_scheduler_type linear"),
        "warmup_steps": (warmup(0.03, rows, n), f"{OI_SFT}: --warmup_ratio 0.03 of the optimizer steps"),
        "weight_decay": (0.0, f"{OI_SFT}: --weight_decay 0.0"),
        "max_grad_norm": (1.0, CLIP),
        "max_length": (4096, f"{OI_SFT}: --max_seq_length 4096"),
        "extra": ({}, ADAMW),
        "assistant_only_loss": (True, "open-instruct's SFT masks every non-assistant token"),
        "lora": (None, FULL),
    }


def tulu3_dpo(params_b: float) -> dict:
    return {
        "learning_rate": (scaled(5e-7, params_b), f"{OI_DPO}: 5e-7 at 8B (2e-7 at 70B), scaled as SFT's"),
        "max_steps": (-1, "epochs decide"),
        "num_train_epochs": (1, f"{OI_DPO}: --num_train_epochs 1"),
        "effective_batch": (128, f"{T3}: effective DPO batch 128 ({OI_DPO}: 8 GPUs × 1 × 16)"),
        "lr_scheduler_type": ("linear", f"{OI_DPO}: --lr_scheduler_type linear"),
        "warmup_steps": (warmup(0.1, 271_409, 1), f"{OI_DPO}: --warmup_ratio 0.1 of 2,121 steps"),
        "weight_decay": (0.0, f"{OI_DPO}: --weight_decay 0.0"),
        "max_grad_norm": (1.0, CLIP),
        "max_length": (2048, f"{OI_DPO}: --max_seq_length 2048 (prompt and answer)"),
        "extra": ({}, ADAMW),
        "loss_type": (["sigmoid_norm"], f"{OI_DPO}: --dpo_loss_type dpo_norm (length-normalised DPO)"),
        "beta": (5.0, f"{OI_DPO}: --dpo_beta 5"),
        "rpo_alpha": (None, f"{T3}: DPO without an NLL term"),
        "loss_weights": (None, "one loss, weight 1"),
        "max_prompt_length": (None, f"{OI_DPO}: only the whole sequence is cut, at 2048"),
        "lora": (None, FULL),
        "rehearsal": ([], f"{T3}: preference pairs only"),
    }


def tulu3_rlvr(params_b: float) -> dict:
    return {
        "learning_rate": (scaled(3e-7, params_b), f"{OI_RLVR}: --learning_rate 3e-7 at 8B, scaled as SFT's"),
        "max_steps": (-1, "epochs decide"),
        "num_train_epochs": (1, f"ours: one pass over the prompts ({OI_RLVR} stops by episodes)"),
        "effective_batch": (224, f"{T3}: RLVR batch 224 at 8B ({OI_RLVR}: 7 actor GPUs × local_mini_batch_size 32)"),
        "lr_scheduler_type": ("linear", f"{OI_PPO}: lr_scheduler_type default linear"),
        "warmup_steps": (0, f"{OI_RLVR}: no --warmup_ratio at 8B (default 0.0)"),
        "weight_decay": (0.01, f"{OI_PPO}: torch.optim.AdamW(policy.parameters(), lr) (torch's default 0.01)"),
        "max_grad_norm": (1.0, f"{OI_PPO}: DeepSpeed gradient_clipping max_norm 1.0"),
        "max_length": (None, "GRPOConfig has none: max_completion_length bounds the answers"),
        "extra": ({"num_iterations": 4}, f"{OI_PPO}: num_epochs 4 PPO updates per rollout batch (GRPO's μ)"),
        "num_generations": (8, "ours: GRPO's group replaces PPO's value model (TÜLU 3: 1 sample per prompt)"),
        "beta": (0.05, f"{OI_RLVR}: --beta 0.05 (KL coefficient, 8B)"),
        "loss_type": ("dapo", "ours: TRL's default token-level mean (TÜLU 3's PPO also averages over tokens)"),
        "epsilon": (0.2, f"{OI_PPO}: cliprange 0.2"),
        "max_completion_length": (2048, f"{OI_RLVR}: --response_length 2048"),
        "temperature": (1.0, f"{OI_RLVR}: --temperature 1.0"),
        "lora": (None, FULL),
    }


MERGE_SFT_EPOCHS = (1, "ours: one epoch per specialist (a second would widen the gap the merge bridges)")
SOURCES: dict[str, dict[str, dict]] = {
    "tulu3_qwen2.5-0.5b.yaml": {
        "sft": tulu3_sft(0.49), "dpo": tulu3_dpo(0.49), "rlvr": tulu3_rlvr(0.49)},
    "tulu3_qwen2.5-0.5b_hft.yaml": {
        "sft": tulu3_sft(0.49), "dpo": tulu3_dpo(0.49), "rlvr": tulu3_rlvr(0.49)},
    "tulu3_llama3.2-1b.yaml": {
        "sft": tulu3_sft(1.24), "dpo": tulu3_dpo(1.24), "rlvr": tulu3_rlvr(1.24)},
    "merge_qwen2.5-0.5b.yaml": {
        "sft_math": tulu3_sft(0.49, MERGE_SFT_EPOCHS, rows=149_960),
        "sft_if": tulu3_sft(0.49, MERGE_SFT_EPOCHS, rows=29_980),
        "merge": {
            "method": ("ties", TIES),
            "params": ({"density": 0.2, "lam": 1.0}, f"{TIES}: keep the top 20% (k = 20), λ = 1 without a "
                                                     "validation set"),
            "weights": ([1.0, 1.0], f"{TIES}: every task vector weighs 1"),
            "per_block": (None, f"{TIES}: one λ for the whole model"),
            "search": (None, "no validation set: the paper's fixed values"),
            "dtype": ("float32", "ours: merge math in float32, output in the inputs' dtype"),
        },
    },
    "transfer_qwen2.5_to_coder.yaml": {
        "transfer": {
            "scale": (1.0, f"{FTT}: the diff added at λ = 1"),
            "per_block": (None, f"{FTT}: one λ for the whole model"),
            "search": (None, f"{FTT}: no search"),
            "tokenizer_from": ("source_finetuned", "ours: Instruct's chat template and turn end, which the "
                                                   "transferred diff was trained to emit"),
            "dtype": ("float32", "ours: diff math in float32, output in the target's dtype"),
        },
    },
}


def test_every_recipe_has_a_source_table():
    assert {p.name for p in RECIPES} == set(SOURCES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_matches_its_source_field_by_field(path):
    stages = {s.name: s for s in load_pipeline(path).stages}
    table = SOURCES[path.name]
    assert set(stages) == set(table), path.name
    for name, stage in stages.items():
        view = _view(stage)
        assert set(view) == set(table[name]), (name, set(view) ^ set(table[name]))  # every field has a source
        for field, (want, source) in table[name].items():
            assert source, (name, field)
            assert view[field] == want, f"{path.name}: {name}.{field} is {view[field]!r}; {source}: {want!r}"


def test_tulu3_dpo_is_adamw_without_an_nll_term():
    """The stage defaults used to be the world's (SGD, RPO's NLL term at 0.5) and leaked into this recipe."""
    dpo = next(s for s in load_pipeline(REPO / "configs" / "recipes" / "tulu3_qwen2.5-0.5b.yaml").stages
               if s.kind == "dpo")
    assert dpo.trl_losses() == (["sigmoid_norm"], [1.0]) and "optim" not in dpo.trainer.extra
