"""Tests for posttrain.hft: Half Fine-Tuning masks (Hui et al. 2024), patterns, and a real training check."""
from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from posttrain.hft import (
    TrainableConfig,
    apply_trainable,
    assert_optimizer_holds_only,
    lora_target_modules,
    select_trainable,
    write_trainable_json,
)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
HFT = TrainableConfig(mode="hft", seed=7)


def llama_names(n_layers: int, bias: bool = False) -> list[str]:
    """Parameter names of a Llama (or, with q/k/v biases, Qwen2) causal LM, without building it."""
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        for m in ATTN:
            names.append(f"model.layers.{i}.self_attn.{m}.weight")
            if bias and m != "o_proj":
                names.append(f"model.layers.{i}.self_attn.{m}.bias")
        names += [f"model.layers.{i}.mlp.{m}.weight" for m in MLP]
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
    return names + ["model.norm.weight", "lm_head.weight"]


def trained_modules(mask: dict[str, bool], block: int, kind: str) -> set[str]:
    pat = re.compile(rf"\.layers\.{block}\.{kind}\.(\w+)\.")
    return {m[1] for n, on in mask.items() if on and (m := pat.search(n))}


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg)


def fresh_llama(llama):
    """A copy, so tests that flip requires_grad or train do not leak into each other."""
    return copy.deepcopy(llama)


def test_hft_llama_half_of_attention_and_stochastic_half_of_mlp(llama):
    names = [n for n, _ in llama.named_parameters()]
    mask = select_trainable(names, HFT, stage_index=0)
    assert set(mask) == set(names)
    for block in range(3):
        assert len(trained_modules(mask, block, "self_attn")) == 2  # 4 -> exactly 2
        assert len(trained_modules(mask, block, "mlp")) in (1, 2)  # 3 -> 1 or 2 (stochastic rounding)
    # Paper-choice defaults: embeddings and lm_head frozen, every norm trained.
    assert not mask["model.embed_tokens.weight"] and not mask["lm_head.weight"]
    assert all(on for n, on in mask.items() if "norm" in n)


def test_stochastic_rounding_averages_to_half():
    """Over many blocks, 3 MLP projections at fraction 0.5 train 1.5 on average, and both 1 and 2 occur."""
    mask = select_trainable(llama_names(400), HFT, stage_index=0)
    counts = [len(trained_modules(mask, b, "mlp")) for b in range(400)]
    assert set(counts) == {1, 2}
    assert abs(sum(counts) / 400 - 1.5) < 0.1
    assert all(len(trained_modules(mask, b, "self_attn")) == 2 for b in range(400))


def test_fraction_other_than_half_is_exact_when_integral():
    mask = select_trainable(llama_names(5), TrainableConfig(mode="hft", fraction=0.25), stage_index=3)
    assert all(len(trained_modules(mask, b, "self_attn")) == 1 for b in range(5))


def test_weight_and_bias_of_a_module_go_together_qwen2_style():
    mask = select_trainable(llama_names(6, bias=True), HFT, stage_index=1)
    for name, on in mask.items():
        if name.endswith(".bias"):
            assert on == mask[name[: -len("bias")] + "weight"], name


def test_same_seed_and_stage_same_mask_and_input_order_irrelevant():
    names = llama_names(8)
    a = select_trainable(names, HFT, stage_index=2)
    b = select_trainable(list(reversed(names)), TrainableConfig(mode="hft", seed=7), stage_index=2)
    assert a == b


def test_new_stage_or_seed_redraws_the_mask():
    names = llama_names(8)
    base = select_trainable(names, HFT, stage_index=0)
    assert select_trainable(names, HFT, stage_index=1) != base
    assert select_trainable(names, TrainableConfig(mode="hft", seed=8), stage_index=0) != base


def test_hft_gpt2_two_of_q_k_v_o_one_of_two_mlp_and_tied_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    from posttrain.hft_layouts import model_info

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=4, n_head=2, vocab_size=50, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    mask = select_trainable(shapes, HFT, stage_index=0, info=model_info(model))
    for b in range(4):
        mlp = {m[1] for n, v in mask.items() if v and (m := re.search(rf"\.h\.{b}\.mlp\.(\w+)\.", n))}
        assert len(mlp) == 1
        # c_attn's q, k, v (16 columns each of its [16, 48] weight) and c_proj: 2 of these 4 units train.
        # (2 of 4 always holds one or two of q, k, v, so c_attn is always partly trained.)
        c_attn = mask[f"transformer.h.{b}.attn.c_attn.weight"]
        columns = {c for a, z in c_attn.spans for c in range(a, z)}
        parts = {c // 16 for c in columns}
        assert c_attn.dim == 1 and len(columns) == 16 * len(parts)  # whole thirds of the columns
        assert len(parts) + mask[f"transformer.h.{b}.attn.c_proj.weight"] == 2
    # wte is also the (tied) lm_head: frozen with the embeddings; wpe frozen; ln_* trained.
    assert not mask["transformer.wte.weight"] and not mask["transformer.wpe.weight"]
    assert mask["transformer.ln_f.weight"] and mask["transformer.h.0.ln_1.bias"]


def test_switches_embeddings_norms_lm_head():
    cfg = TrainableConfig(mode="hft", embeddings=True, norms=False, lm_head=True)
    mask = select_trainable(llama_names(2), cfg, stage_index=0)
    assert mask["model.embed_tokens.weight"] and mask["lm_head.weight"]
    assert not any(on for n, on in mask.items() if "norm" in n)


def test_all_mode_trains_everything():
    mask = select_trainable(llama_names(2), TrainableConfig(), stage_index=5)
    assert all(mask.values())


def test_patterns_mode():
    names = llama_names(3)
    cfg = TrainableConfig(mode="patterns", train=[r"\.mlp\.", r"norm"], freeze=[r"layers\.0\."])
    mask = select_trainable(names, cfg, stage_index=0)
    expected = {n for n in names if (".mlp." in n or "norm" in n) and "layers.0." not in n}
    assert {n for n, on in mask.items() if on} == expected
    only_freeze = select_trainable(names, TrainableConfig(mode="patterns", freeze=["embed"]), 0)
    assert [n for n, on in only_freeze.items() if not on] == ["model.embed_tokens.weight"]


def test_pattern_matching_nothing_is_an_error_naming_it():
    cfg = TrainableConfig(mode="patterns", train=[r"\.mlp\."], freeze=[r"c_attn"])
    with pytest.raises(ValueError, match="c_attn"):
        select_trainable(llama_names(2), cfg, stage_index=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "hft", "fraction": 0.0}, "strictly between 0 and 1"),
        ({"mode": "hft", "fraction": 1.0}, "strictly between 0 and 1"),
        ({"mode": "patterns", "train": ["("]}, "not a valid regex"),
        ({"mode": "hft", "train": ["mlp"]}, "only with mode 'patterns'"),
        ({"mode": "patterns"}, "at least one"),
        ({"mode": "all", "embeddings": True}, "only with mode 'hft'"),
        ({"mode": "hft", "frction": 0.5}, "Extra inputs"),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        TrainableConfig(**kwargs)


def test_unknown_block_member_is_an_error_in_hft():
    names = llama_names(1) + ["model.layers.0.router.weight"]
    with pytest.raises(ValueError, match="router"):
        select_trainable(names, HFT, stage_index=0)
    # Outside the blocks an unknown tensor is a head, and heads train.
    assert select_trainable(llama_names(1) + ["score.weight"], HFT, 0)["score.weight"]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_training_moves_only_trained_tensors(llama, tmp_path):
    model = fresh_llama(llama)
    summary = apply_trainable(model, HFT, stage_index=0)
    before = {n: _digest(p) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 100, (2, 8), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = {n: _digest(p) for n, p in model.named_parameters()}
    mask = summary["parameters"]
    assert {n for n in mask if not mask[n] and before[n] != after[n]} == set()  # frozen: bit-identical
    assert {n for n in mask if mask[n] and before[n] == after[n]} == set()  # trained: all changed
    assert assert_optimizer_holds_only(opt, model) == {n for n, on in mask.items() if on}
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert summary["trained"] == sum(sizes[n] for n, on in mask.items() if on)
    assert summary["trained"] + summary["frozen"] == sum(sizes.values())
    path = write_trainable_json(summary, tmp_path / "stage" / "trainable.json")
    assert json.loads(path.read_text())["parameters"] == mask


def test_optimizer_check_refuses_frozen_parameters(llama):
    model = fresh_llama(llama)
    apply_trainable(model, HFT, stage_index=0)
    opt = torch.optim.AdamW(model.parameters())  # the mistake: frozen tensors handed to the optimizer
    with pytest.raises(AssertionError, match="frozen"):
        assert_optimizer_holds_only(opt, model)


def test_lora_adapters_only_on_selected_modules(llama):
    from peft import LoraConfig, get_peft_model

    model = fresh_llama(llama)
    names = [n for n, _ in model.named_parameters()]
    mask = select_trainable(names, HFT, stage_index=1)
    targets = lora_target_modules(names, mask)
    assert targets and all(t.startswith("model.layers.") and not t.endswith("weight") for t in targets)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    hosts = {n.split(".lora_A.")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert {h.removeprefix("base_model.model.") for h in hosts} == set(targets)
    # On the peft model the same selection trains exactly the adapters, never a base weight.
    summary = apply_trainable(peft_model, HFT, stage_index=1)
    on = {n for n, v in summary["parameters"].items() if v}
    assert on and all(".lora_" in n for n in on)
    assert on == {n for n, _ in peft_model.named_parameters() if ".lora_" in n}
    assert lora_target_modules(list(summary["parameters"]), summary["parameters"]) == targets
    counts = Counter(n.split(".lora_")[1].split(".")[0] for n in on)
    assert counts == {"A": len(targets), "B": len(targets)}


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "model.layers.1.mlp.down_proj"]])
def test_lora_adapters_counts_what_peft_adds_without_touching_the_model_or_the_seed(llama, targets):
    """What a LoRA stage's trainable.json counts: the same modules and elements peft's get_peft_model adds to
    the real model, found without changing the model, the config, or torch's generator (the trainer's
    adapter init must draw the same numbers as without the count)."""
    from peft import LoraConfig, get_peft_model

    from posttrain.stages.common import lora_adapters

    model = fresh_llama(llama)
    before = {n: p.clone() for n, p in model.named_parameters()}
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    given, rng = copy.deepcopy(cfg.target_modules), torch.random.get_rng_state()
    modules, parameters, count = lora_adapters(model, cfg)
    assert torch.equal(torch.random.get_rng_state(), rng) and cfg.target_modules == given
    assert dict(model.named_parameters()).keys() == before.keys()  # no adapter injected into the model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    peft_model = get_peft_model(model, cfg)
    adapters = {n: p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n}
    assert count == sum(adapters.values()) > 0
    assert modules == sorted({n.split(".lora_")[0].removeprefix("base_model.model.") for n in adapters})
    assert "lm_head" not in modules and len(modules) == (3 * 7 if targets == "all-linear" else 3 + 1)
    assert parameters == []  # a dense model: no expert tensors
