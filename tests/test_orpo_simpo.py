"""ORPO and SimPO stages (reference-free preference losses on TRL's ORPO and CPO trainers): defaults, the world
configs, a few steps on the world through `posttrain stage <kind>` with the loss checked against the logged terms
it is made of, and HFT and LoRA in one pipeline (frozen tensors bit-identical, no reference model loaded)."""
import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import posttrain.stages  # noqa: F401
from posttrain.cli import REPO_CONFIGS, main
from posttrain.config import load_pipeline, stage_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.registry import STAGES

TINY = {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3,
        "save_steps": 50, "max_length": 96, "gradient_checkpointing": False, "extra": {"optim": "sgd"}}


def _losses(stage_dir):
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def _digests(folder) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in load_file(folder / "model.safetensors").items()}


def test_orpo_defaults_are_trls_and_simpo_defaults_the_papers():
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    orpo, trl = STAGES.get("orpo").config(), ORPOConfig(output_dir="unused", use_cpu=True)
    assert (orpo.kind, orpo.trainer.learning_rate, orpo.beta) == ("orpo", trl.learning_rate, trl.beta)
    simpo, cpo = STAGES.get("simpo").config(), CPOConfig(output_dir="unused", use_cpu=True)
    assert simpo.trainer.learning_rate == cpo.learning_rate and simpo.label_smoothing == cpo.label_smoothing
    # SimPO (Meng et al. 2024; the authors' README): beta 2.0, gamma/beta 0.5, no NLL term (TRL's CPO has 1.0).
    assert (simpo.beta, simpo.gamma_beta_ratio, simpo.cpo_alpha) == (2.0, 0.5, 0.0)
    assert [s.source for s in orpo.data] == [s.source for s in simpo.data] == ["style"]


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_make_stage_config_states_the_world_tuning(kind):
    stage = stage_pipeline(kind, REPO_CONFIGS / "stages" / f"{kind}.yaml", []).stages[0]
    assert stage.kind == kind and stage.model == "world-sft" and stage.trains_on == ["world_style"]
    assert stage.trainer.extra == {"optim": "sgd"} and stage.trainer.learning_rate > 1e-6


def _stage(kind, tmp_path, *sets):
    sets = ["eval.enabled=false", "model=world", "data=[{source: style, limit: 16}]", "trainer.max_steps=3",
            "trainer.logging_steps=1", "trainer.gradient_checkpointing=false", *sets]
    assert main(["stage", kind, "--run-dir", str(tmp_path / kind), *[a for s in sets for a in ("--set", s)]]) == 0
    return tmp_path / kind / "stages" / f"01_{kind}"


def test_orpo_loss_is_nll_minus_lambda_log_odds_and_every_parameter_moves(world, tmp_path):
    out = _stage("orpo", tmp_path, "trainer.per_device_train_batch_size=4", "beta=0.25")
    logs = _losses(out)
    assert [r["step"] for r in logs] == [1, 2, 3]
    # Hong et al. 2024, Eq. 6: L = L_SFT + lambda * L_OR, with L_OR = -log sigmoid(log odds ratio).
    for r in logs:
        assert r["loss"] == pytest.approx(r["nll_loss"] - 0.25 * r["log_odds_ratio"], rel=1e-5)
    base, after = load_file(world / "base" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    unchanged = [k for k in base if torch.equal(base[k], after[k])]
    assert set(base) == set(after) and not unchanged, unchanged
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out / "model"), AutoTokenizer.from_pretrained(out / "model")
    ids = tok("Tell me the", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_simpo_loss_is_the_margin_loss_of_length_averaged_rewards_plus_the_nll_term(world, tmp_path):
    """One pair a step, so the logged terms are that pair's: loss = -log sigmoid(margin - gamma) + cpo_alpha * NLL
    with gamma = 0.5 * beta (the world config's cpo_alpha, 0.5; the class default 0 leaves the margin loss)."""
    out = _stage("simpo", tmp_path, "trainer.per_device_train_batch_size=1", "beta=2.0")
    logs = _losses(out)
    assert [r["step"] for r in logs] == [1, 2, 3]
    for r in logs:
        margin_loss = -math.log(1 / (1 + math.exp(-(r["rewards/margins"] - 1.0))))
        assert r["loss"] == pytest.approx(margin_loss + 0.5 * r["nll_loss"], rel=1e-5)
        # The rewards are beta times the length-averaged log-likelihoods, and the NLL is the chosen answer's
        # mean token NLL: minus its length-averaged log-likelihood.
        assert r["rewards/chosen"] == pytest.approx(2.0 * r["logps/chosen"], rel=1e-5)
        assert r["nll_loss"] == pytest.approx(-r["logps/chosen"], rel=1e-5)
    assert _digests(out / "model") != _digests(world / "base")


def test_hft_freezes_its_half_and_lora_loads_one_model(world, tmp_path, monkeypatch):
    """Both kinds in one pipeline: ORPO with HFT, SimPO with LoRA; neither loads a reference model."""
    import posttrain.stages.trl_run as trl_run

    loads = []
    real = trl_run.load_model
    monkeypatch.setattr(trl_run, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    data = [{"source": "style", "limit": 8}]
    stages = [{"name": "orpo_hft", "kind": "orpo", "model": "world", "data": data, "trainer": TINY,
               "trainable": {"mode": "hft", "seed": 0}},
              {"name": "simpo_lora", "kind": "simpo", "model": "world", "data": data, "trainer": TINY,
               "lora": {"r": 4, "alpha": 8}}]
    run_pipeline(load_pipeline(None, data={"eval": {"enabled": False}, "stages": stages}), tmp_path / "r",
                 lambda m: None)
    assert len(loads) == 2  # the policies only
    out = tmp_path / "r" / "stages" / "01_orpo_hft"
    before, after = _digests(world / "base"), _digests(out / "model")
    mask = json.loads((out / "trainable.json").read_text())["parameters"]
    assert set(mask) == set(before) == set(after) and 0 < sum(mask.values()) < len(mask)
    assert [n for n, on in mask.items() if not on and before[n] != after[n]] == []  # frozen: bit-identical
    assert [n for n, on in mask.items() if on and before[n] == after[n]] == []  # trained: moved
    lora = tmp_path / "r" / "stages" / "02_simpo_lora"
    assert (lora / "adapter" / "adapter_config.json").is_file() and (lora / "DONE").is_file()
    assert _digests(lora / "model") != before  # the merged adapters changed the weights
