"""Class defaults are for real models: TRL's own; the embedded world's tuned values live only in its configs.

Two halves. (1) Every field a stage class's default shares with TRL's config dataclass (SFTConfig, DPOConfig,
GRPOConfig, KTOConfig, ORPOConfig, CPOConfig, RewardConfig, RLOOConfig as installed, trl 1.16) equals TRL's default, except the deliberate deviations listed below with
their reasons. (2) Every world config (configs/stages/, configs/pipelines/ with claims and experiments, and the
cached world models of posttrain/world/trained.py) resolves to the world's trainer block of its kind
(posttrain/world/tuning.py), so that `make stage=...` and `make claims` train as they did before the defaults
became TRL's, and a world stage that forgets its block fails here instead of training for hours.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import posttrain.stages  # noqa: F401  (registers the stage kinds)
from posttrain.config import load_pipeline, read_yaml, stage_pipeline
from posttrain.registry import STAGES
from posttrain.stages.common import TrainerConfig
from posttrain.world.tuning import WORLD_STAGE_FIELDS, WORLD_TRAINERS

REPO = Path(__file__).resolve().parent.parent
KINDS = ("sft", "dpo", "grpo")  # the kinds the world tunes in posttrain/world/tuning.py
# The kinds on a TRL trainer (the world values of the others are in configs/stages/<kind>.yaml).
TRL_KINDS = KINDS + ("kto", "orpo", "simpo", "reward", "rloo")

# Every field a default stage config shares with TRL's config, by name (trainer fields and stage fields).
# Listed rather than computed only, so that a field added on either side is a decision, not a silent pass.
COMMON = {"learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
          "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
          "logging_steps", "save_steps", "save_total_limit", "gradient_checkpointing", "bf16", "seed",
          "trust_remote_code", "report_to"}
SHARED = {
    "sft": COMMON | {"max_length", "assistant_only_loss", "packing", "padding_free"},
    "dpo": COMMON | {"max_length", "loss_type", "beta", "loss_weights"},
    "grpo": COMMON | {"num_generations", "beta", "loss_type", "epsilon", "max_completion_length", "temperature"},
    "kto": COMMON | {"max_length", "loss_type", "beta", "desirable_weight", "undesirable_weight"},
    "orpo": COMMON | {"max_length", "beta"},
    "simpo": COMMON | {"max_length", "beta", "cpo_alpha", "label_smoothing"},  # CPOConfig's (loss_type: simpo)
    "reward": COMMON | {"max_length", "center_rewards_coefficient"},
    "rloo": COMMON | {"num_generations", "beta", "epsilon", "max_completion_length", "temperature",
                      "normalize_advantages"},
}

# Deliberate deviations from TRL's defaults: (kind, field) -> (our value, why).
DEVIATIONS = {
    **{(kind, "seed"): (None, "None takes the pipeline's seed (PipelineConfig.seed, recorded in pipeline.yaml), so "
                              "one number seeds every stage of a run; TRL's 42 would ignore it") for kind in TRL_KINDS},
    **{(kind, "save_total_limit"): (2, "a rerun resumes from the newest complete checkpoint and falls back to the "
                                       "one before it if the newest was cut short; TRL keeps every checkpoint, "
                                       "which fills a disk on a real model") for kind in TRL_KINDS},
    **{(kind, "report_to"): (None, "None takes the pipeline's report_to (default none, TRL's value), so one line "
                                   "sends every stage of a run to a tracker") for kind in TRL_KINDS},
    ("sft", "assistant_only_loss"): (True, "chat rows train on the assistant turns only: prompts and user turns are "
                                           "inputs, not targets (TRL's default, False, trains on them; TÜLU 3 masks "
                                           "them too). Prompt/completion rows train on the completion either way"),
    # SimPO on TRL's CPO trainer: the SimPO paper's values (Meng et al. 2024, arXiv 2405.14734, and the authors'
    # README), not CPO's, whose defaults TRL's CPOConfig holds.
    ("simpo", "beta"): (2.0, "SimPO's beta scales length-averaged log-likelihoods and needs to be much larger than "
                             "DPO's: the paper uses 2.0 to 2.5 (2.0 for its Llama-3-Base and Mistral-Base runs); "
                             "TRL's 0.1 is CPO's"),
    ("simpo", "cpo_alpha"): (0.0, "SimPO has no NLL term (the SimPO authors' sft_weight 0.0; TRL's docs set "
                                  "cpo_alpha=0 for SimPO); TRL's 1.0 is CPO's behaviour-cloning weight"),
}


def _trl_config(kind: str) -> type:
    from trl import DPOConfig, GRPOConfig, KTOConfig, RewardConfig, RLOOConfig, SFTConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    return {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "kto": KTOConfig, "orpo": ORPOConfig,
            "simpo": CPOConfig, "reward": RewardConfig, "rloo": RLOOConfig}[kind]


def _trl_defaults(kind: str) -> dict:
    out = {}
    for f in dataclasses.fields(_trl_config(kind)):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _ours(kind: str) -> dict:
    """The default stage config of `kind`, trainer fields and stage fields side by side (`extra` aside)."""
    cfg = STAGES.get(kind).config()
    trainer = cfg.trainer.model_dump()
    assert trainer.pop("extra") == {}, f"{kind}: the default passes TRL fields through trainer.extra"
    stage = {k: getattr(cfg, k) for k in type(cfg).model_fields if k != "trainer"}
    assert not set(trainer) & set(stage)
    return {**trainer, **stage}


def _value(v):
    return getattr(v, "value", v)  # TRL's scheduler default is transformers' SchedulerType enum


@pytest.mark.parametrize("kind", TRL_KINDS)
def test_class_defaults_are_trls_except_the_listed_deviations(kind):
    ours, theirs = _ours(kind), _trl_defaults(kind)
    assert set(ours) & set(theirs) == SHARED[kind]
    for name in sorted(SHARED[kind]):
        if (kind, name) in DEVIATIONS:
            assert ours[name] == DEVIATIONS[kind, name][0] != _value(theirs[name]), (kind, name)
        else:
            assert ours[name] == _value(theirs[name]), f"{kind}.{name}: ours {ours[name]!r}, TRL's {theirs[name]!r}"


def test_defaults_add_no_loss_term_and_keep_trls_optimizer():
    """The issue's examples: a `kind: dpo` stage with nothing else set is plain DPO with AdamW, not the world's
    SGD with RPO's NLL term; GRPO completions are TRL's 512 tokens, not the world's 8."""
    dpo = STAGES.get("dpo").config()
    assert dpo.trl_losses() == (["sigmoid"], [1.0]) and dpo.rpo_alpha is None
    assert "optim" not in dpo.trainer.extra and _trl_defaults("dpo")["optim"] == "adamw_torch_fused"
    assert STAGES.get("grpo").config().max_completion_length == 512
    # A partial trainer merges over the real-model defaults, not over the world's.
    partial = load_pipeline(None, data={"stages": [{"kind": "dpo", "trainer": {"max_steps": 5}}]}).stages[0]
    assert partial.trainer.learning_rate == 1e-6 and partial.trainer.extra == {}


# ---- the world's configs state the world's tuning ------------------------------------------------------------

# Fields a world config changes on purpose from its kind's block in posttrain/world/tuning.py.
WORLD_CHANGES = {
    ("stages/dpo.yaml", "dpo"): {"learning_rate": 0.1, "max_steps": 300, "save_steps": 150, "logging_steps": 20},
    ("pipelines/recycle_then_finetune.yaml", "sft_recycled"): {"max_steps": 60},
    ("pipelines/recycle_then_finetune.yaml", "sft_from_v2"): {"max_steps": 60},
    ("pipelines/claims/recycle_then_finetune.yaml", "sft_recycled"): {"max_steps": 60},
    ("pipelines/claims/recycle_then_finetune.yaml", "sft_from_v2"): {"max_steps": 60},
    # the claims' rungs: the world's SFT tuning stopped early (warmup a tenth of a short rung)
    **{("pipelines/claims/hft_vs_full.yaml", f"full_reversal_{k}"): {"max_steps": k, "learning_rate": 5e-4}
       for k in (100, 200, 300, 400, 800)},
    ("pipelines/claims/hft_vs_full.yaml", "hft_reversal"): {"learning_rate": 5e-4},
    **{("pipelines/claims/grpo_vs_sft.yaml", f"sft_verifiable_{k}"): {"max_steps": k, "warmup_steps": max(1, k // 10)}
       for k in (5, 10, 20, 40, 80, 160)},
    ("pipelines/experiments/merge_regime.yaml", "sft_arithmetic"): {"learning_rate": 5e-4},
    ("pipelines/experiments/merge_regime.yaml", "sft_reversal"): {"learning_rate": 5e-4},
    # Claim 4's specialists of world-large (11M): small updates by a rule fixed before any merge was run.
    **{("pipelines/claims/merge_methods.yaml", name): {"learning_rate": 1e-3, "max_steps": 400}
       for name in ("spec_arithmetic", "spec_reversal")},
}


def _world_configs():
    stages = REPO / "configs" / "stages"
    base = read_yaml(REPO / "configs" / "default.yaml")
    for path in sorted(stages.glob("*.yaml")):
        yield f"stages/{path.name}", stage_pipeline(path.stem, path, None, base=dict(base))
    for path in sorted((REPO / "configs" / "pipelines").rglob("*.yaml")):
        yield str(path.relative_to(REPO / "configs")), load_pipeline(path)


WORLD = list(_world_configs())


def test_world_trainer_blocks_name_every_trainer_field():
    assert all(set(block) == set(TrainerConfig.model_fields) for block in WORLD_TRAINERS.values())
    assert set(WORLD_TRAINERS) == set(WORLD_STAGE_FIELDS) == set(KINDS)


@pytest.mark.parametrize("where, cfg", WORLD, ids=[w for w, _ in WORLD])
def test_world_config_resolves_to_the_world_tuning(where, cfg):
    trainable = [s for s in cfg.stages if s.kind in KINDS]
    for stage in trainable:
        want = {**WORLD_TRAINERS[stage.kind], **WORLD_CHANGES.get((where, stage.name), {})}
        assert stage.trainer.model_dump() == want, (where, stage.name)
        assert {k: getattr(stage, k) for k in WORLD_STAGE_FIELDS[stage.kind]} == WORLD_STAGE_FIELDS[stage.kind]
    assert {n for w, n in WORLD_CHANGES if w == where} <= {s.name for s in trainable}  # no stale entry


def test_every_world_config_is_checked():
    names = {w for w, _ in WORLD}
    assert {"stages/sft.yaml", "stages/dpo.yaml", "stages/grpo.yaml", "pipelines/sft_dpo_grpo.yaml",
            "pipelines/claims/grpo_vs_sft.yaml", "pipelines/experiments/merge_regime.yaml"} <= names
    kinds = {s.kind for _, cfg in WORLD for s in cfg.stages}
    assert set(KINDS) <= kinds


def test_cached_world_models_train_with_the_world_blocks():
    """The SFT models with the world's SFT block; the merge demo's specialists are configs/stages/dpo.yaml and
    grpo.yaml exactly, as stages of their own (what they train for the report aside)."""
    from posttrain.world.trained import RECIPES, _pipeline

    shipped = dict(WORLD)
    for name, recipe in RECIPES.items():
        stage = _pipeline(name, recipe).stages[0]
        if stage.kind == "sft":
            assert stage.trainer.model_dump() == WORLD_TRAINERS["sft"], name
            continue
        demo = shipped[f"stages/{stage.kind}.yaml"].stages[0]
        fields = set(type(stage).model_fields) - {"name", "trains_on"}
        assert stage.model_dump(include=fields) == demo.model_dump(include=fields), name
