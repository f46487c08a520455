"""HFT on MoE and fused layers (posttrain.hft_layouts): experts drawn whole, fused projections split into their
parts as the modeling code reads them, block shares of one half, the frozen-slice guard, the tied lm_head
switch, and LoRA on the routed experts. Tiny random models from transformers' config classes; no training
loop here (tests/test_hft_fused_moe.py trains them through the sft stage)."""
from __future__ import annotations

import importlib
import re
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import ConfigError
from posttrain.hft import TrainableConfig, apply_trainable, frozen_slices, select_trainable
from posttrain.hft_layouts import ModelInfo, Part, block_units, model_info

HFT = TrainableConfig(mode="hft", seed=3)
MOE = ("qwen2_moe", "mixtral", "qwen3_moe")
FUSED = ("gpt2", "phi3", "gpt_neox")


def tiny_config(kind: str, layers: int = 2, kv_heads: int = 2, **ids):
    """A config of `kind` with hidden 32, 4 heads, 4 experts of 2 per token; `ids` are token ids."""
    import transformers as tf

    attn = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, vocab_size=64, **ids)
    moe = dict(num_experts_per_tok=2, num_key_value_heads=kv_heads, moe_intermediate_size=16)
    return {
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**attn, **moe, intermediate_size=64, num_experts=4,
                                               shared_expert_intermediate_size=32),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**attn, **moe, intermediate_size=64, num_experts=4),
        "mixtral": lambda: tf.MixtralConfig(**attn, num_experts_per_tok=2, num_key_value_heads=kv_heads,
                                            intermediate_size=16, num_local_experts=4),
        "phi3": lambda: tf.Phi3Config(**{**attn, "pad_token_id": ids.get("pad_token_id", 0)}, intermediate_size=64,
                                      num_key_value_heads=kv_heads),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, vocab_size=64, **ids),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**attn, intermediate_size=64),
    }[kind]()


def tiny_model(kind: str, layers: int = 2, kv_heads: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, layers, kv_heads), attn_implementation="eager")
    return model.eval()  # no dropout: GPT-2 and NeoX have some


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _expert_tensors(mask: dict, block: str) -> dict[str, object]:
    return {n: v for n, v in mask.items() if n.startswith(block + ".mlp.experts.")}


def _trained_experts(part) -> set[int]:
    if isinstance(part, bool):
        return set(range(4)) if part else set()
    assert part.dim == 0
    return {e for a, b in part.spans for e in range(a, b)}


# ---- MoE: whole experts, half of them, router frozen ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_trains_half_of_each_blocks_experts_whole_and_freezes_the_router(kind):
    model = tiny_model(kind, layers=6, kv_heads=4)
    mask = select_trainable(_shapes(model), HFT, 1, model_info(model))
    for b in range(6):
        block = f"model.layers.{b}"
        experts = _expert_tensors(mask, block)
        assert set(experts) == {f"{block}.mlp.experts.gate_up_proj", f"{block}.mlp.experts.down_proj"}
        drawn = [_trained_experts(v) for v in experts.values()]
        assert drawn[0] == drawn[1] and len(drawn[0]) == 2  # the same 2 of 4 experts in both tensors
        assert mask[f"{block}.mlp.gate.weight"] is False
    summary = apply_trainable(model, HFT, 1)
    assert summary["moe"]["router"] == "frozen" and "shared_expert" not in summary["moe"]
    for shares in summary["blocks"].values():  # 4 equal attention projections (MHA), 2 of 4 equal experts
        assert shares["attn"] == 0.5 and 0.45 < shares["mlp"] < 0.5 and 0.45 < shares["total"] < 0.55


def test_qwen2_moe_shared_expert_is_one_more_expert_and_the_router_switch():
    model = tiny_model("qwen2_moe", layers=12)
    shapes = _shapes(model)
    mask = select_trainable(shapes, HFT, 0, model_info(model))
    counts = []
    for b in range(12):
        block = f"model.layers.{b}"
        drawn = [_trained_experts(v) for v in _expert_tensors(mask, block).values()]
        assert drawn[0] == drawn[1]
        shared = {mask[f"{block}.mlp.shared_expert.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
        assert len(shared) == 1  # the shared expert's projections go together
        counts.append(len(drawn[0]) + shared.pop())
        assert not mask[f"{block}.mlp.gate.weight"] and not mask[f"{block}.mlp.shared_expert_gate.weight"]
    assert set(counts) == {2, 3}  # half of 5 experts, stochastically rounded
    router = select_trainable(shapes, TrainableConfig(mode="hft", router=True), 0, model_info(model))
    assert router["model.layers.0.mlp.gate.weight"] and router["model.layers.0.mlp.shared_expert_gate.weight"]
    summary = apply_trainable(model, HFT, 0)
    assert summary["moe"] == {"experts": "drawn whole (an expert's slices of every expert tensor together)",
                              "router": "frozen", "shared_expert": "drawn as one more expert"}


# ---- fused projections: split by rows as the modeling code reads them ---------------------------------------------

EXPECTED_PARTS = {"gpt2": ("q", "k", "v"), "phi3": ("q", "k", "v"), "gpt_neox": ("q", "k", "v")}


def _attention_units(model) -> dict[str, list]:
    return {b: u.attn for b, u in block_units(_shapes(model), model_info(model)).items()}


def _fused_parts(units: list) -> dict[str, object]:
    """{part: unit} of the units that are parts of a fused tensor (keyed "<module>[<part>]")."""
    return {u.key.rsplit("[", 1)[1].rstrip("]"): u for u in units if "[" in u.key}


@pytest.mark.parametrize("kind", FUSED)
def test_fused_attention_draws_two_of_q_k_v_o_and_half_of_the_attention(kind):
    """The old draw took a fused qkv tensor as one projection: a block trained 3/4 or 1/4 of its attention."""
    model = tiny_model(kind, layers=8, kv_heads=4)
    for block, units in _attention_units(model).items():
        assert sorted(_fused_parts(units)) == ["k", "q", "v"] and len(units) == 4, block
    summary = apply_trainable(model, HFT, 2)
    assert summary["blocks"] and all(s["attn"] == 0.5 for s in summary["blocks"].values())
    mlp = [s["mlp"] for s in summary["blocks"].values()]
    assert 0.35 < sum(mlp) / len(mlp) < 0.65  # GPT-2/NeoX: 1 of 2 MLP projections; Phi-3: 1 or 2 of gate, up, down
    partial = [n for n, v in summary["parameters"].items() if isinstance(v, dict)]
    assert partial and len(frozen_slices(model)) == len(partial)  # fused tensors are partly trained, and guarded


def _capture_qkv(monkeypatch, kind: str) -> list:
    """Record (query, key, value) at the model's eager attention function: what the modeling code split."""
    module = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    seen: list = []
    real = module.eager_attention_forward

    def capture(mod, query, key, value, *args, **kwargs):
        seen.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
        return real(mod, query, key, value, *args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", capture)
    return seen


@pytest.mark.parametrize("kind", FUSED)
def test_the_rows_called_q_k_v_are_what_the_model_uses_as_q_k_v(kind, monkeypatch):
    """Perturbing the rows a unit names changes that one of the query, key and value states only."""
    model = tiny_model(kind, layers=1)
    seen = _capture_qkv(monkeypatch, kind)
    ids = torch.arange(1, 9).unsqueeze(0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        model(input_ids=ids)
        base = seen.pop()
        for part, unit in _fused_parts(next(iter(_attention_units(model).values()))).items():
            saved = {p.name: params[p.name].detach().clone() for p in unit.pieces}
            for p in unit.pieces:
                for a, b in p.spans:
                    params[p.name].narrow(p.dim, a, b - a).add_(1.0)
            model(input_ids=ids)
            changed = [not torch.equal(x, y) for x, y in zip(base, seen.pop())]
            assert changed == [part == "q", part == "k", part == "v"], (unit.key, changed)
            for name, value in saved.items():
                params[name].copy_(value)


def test_phi3_gate_up_rows_are_the_gate_and_the_up_projection():
    model = tiny_model("phi3", layers=1)
    mlp = model.model.layers[0].mlp
    seen: list = []
    mlp.activation_fn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    units = _fused_parts(block_units(_shapes(model), model_info(model))["model.layers.0"].mlp)
    assert set(units) == {"gate", "up"}
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        base_out = mlp(x)
        base_in = seen.pop()
        for part, unit in units.items():
            (piece,) = unit.pieces
            saved = mlp.gate_up_proj.weight.clone()
            a, b = piece.spans[0]
            mlp.gate_up_proj.weight[a:b] += 1.0
            out = mlp(x)
            assert torch.equal(seen.pop(), base_in) == (part == "up")  # the activation reads the gate rows
            assert not torch.equal(out, base_out)
            mlp.gate_up_proj.weight.copy_(saved)


def test_neox_query_key_value_is_split_per_head():
    """[heads * (q, k, v) * head_dim] interleaved (modeling_gpt_neox views it as [..., heads, 3*head_dim])."""
    model = tiny_model("gpt_neox", layers=1)
    units = _fused_parts(_attention_units(model)["gpt_neox.layers.0"])
    d = 8  # 32 hidden / 4 heads
    for i, part in enumerate("qkv"):
        assert units[part].pieces[0].spans == tuple((h * 3 * d + i * d, h * 3 * d + (i + 1) * d) for h in range(4))


def test_a_fused_projection_without_a_known_layout_is_refused():
    names = {"transformer.h.0.self_attention.query_key_value.weight": (96, 32),
             "transformer.h.0.self_attention.dense.weight": (32, 32),
             "transformer.h.0.mlp.dense_h_to_4h.weight": (64, 32)}
    with pytest.raises(ConfigError, match=r"query_key_value.*'falcon'.*patterns"):
        select_trainable(names, HFT, 0, ModelInfo("falcon", 4, 4, 8))


# ---- the frozen-slice guard --------------------------------------------------------------------------------------

def _frozen_and_trained(param, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.zeros(part.size, dtype=torch.bool)
    for a, b in part.spans:
        keep[a:b] = True
    idx, t = torch.arange(part.size), param.detach()
    return t.index_select(part.dim, idx[~keep]), t.index_select(part.dim, idx[keep])  # copies


@pytest.mark.parametrize("restore", [True, False])
def test_guard_keeps_frozen_slices_bit_identical_under_adamw_weight_decay(restore):
    """Gradients of frozen slices are zero, yet AdamW's decoupled weight decay moves them (restore=False shows
    it); restoring after each optimizer step keeps them bit-identical while the trained slices move."""
    model = tiny_model("mixtral", layers=2)
    apply_trainable(model, HFT, 0)
    guard, params = frozen_slices(model), dict(model.named_parameters())
    parts = _parts(model)
    assert len(guard) == len(parts) == 4  # gate_up_proj and down_proj of 2 blocks
    before = {n: _frozen_and_trained(params[n], p) for n, p in parts.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    callback = guard.callback()
    for step in range(3):
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        for n, p in parts.items():
            assert not _frozen_and_trained(params[n].grad, p)[0].any()  # the gradient mask
        opt.step()
        if restore:
            callback.on_optimizer_step(None, None, None)
        opt.zero_grad()
    for n, p in parts.items():
        frozen, trained = _frozen_and_trained(params[n], p)
        assert torch.equal(frozen, before[n][0]) == restore
        assert not torch.equal(trained, before[n][1])


def _parts(model) -> dict[str, Part]:
    """The partly trained tensors of HFT's draw (stage 0) on `model`."""
    return {n: v for n, v in select_trainable(_shapes(model), HFT, 0, model_info(model)).items() if isinstance(v, Part)}


def test_reapplying_replaces_the_gradient_hooks():
    model = tiny_model("gpt2", layers=1)
    apply_trainable(model, HFT, 0)
    first = frozen_slices(model)
    apply_trainable(model, TrainableConfig(), 0)  # mode all: nothing partial, the old hooks are gone
    assert frozen_slices(model) is None and not first.handles
    ids = torch.arange(1, 9).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "c_attn" in n)


# ---- embeddings tied to the lm_head ------------------------------------------------------------------------------

def test_lm_head_switch_on_a_tied_model_trains_the_embeddings_and_warns():
    gpt2 = tiny_model("gpt2", layers=1)
    summary = apply_trainable(gpt2, TrainableConfig(mode="hft", lm_head=True), 0)
    assert summary["parameters"]["transformer.wte.weight"] is True  # the one tensor that is also the lm_head
    assert summary["parameters"]["transformer.wpe.weight"] is False
    assert summary["warnings"] == ["trainable.lm_head: true on a model with tied embeddings (one tensor) trains its "
                                   "input embeddings too"]
    emb = apply_trainable(gpt2, TrainableConfig(mode="hft", embeddings=True), 0)
    assert emb["parameters"]["transformer.wte.weight"] and "trains its lm_head too" in emb["warnings"][0]
    assert not apply_trainable(gpt2, HFT, 0)["warnings"] and not apply_trainable(gpt2, HFT, 0)["parameters"][
        "transformer.wte.weight"]
    phi3 = tiny_model("phi3", layers=1)  # untied: the switch trains lm_head alone, without a warning
    untied = apply_trainable(phi3, TrainableConfig(mode="hft", lm_head=True), 0)
    assert untied["parameters"]["lm_head.weight"] and not untied["parameters"]["model.embed_tokens.weight"]
    assert untied["warnings"] == []


# ---- LoRA on MoE -------------------------------------------------------------------------------------------------

def _lora(model, **lora):
    from posttrain.stages.common import LoraSpec, lora_adapters
    from posttrain.stages.selection import lora_config

    trainable = TrainableConfig(**lora.pop("trainable", {}))
    stage = SimpleNamespace(lora=LoraSpec(r=2, alpha=4, **lora), trainable=trainable)
    summary = apply_trainable(model, trainable, 1)
    warnings: list[str] = []
    cfg = lora_config(model, stage, summary["parameters"], warnings)
    return lora_adapters(model, cfg), warnings, summary


@pytest.mark.parametrize("kind", MOE)
def test_lora_all_linear_adapts_the_routed_experts_and_routers(kind):
    """peft's all-linear misses the 3-D expert tensors of transformers 5 (it adds them itself for Mixtral-style
    model types only); every MoE model gets them, and its routers, through target_parameters."""
    model = tiny_model(kind)
    (modules, parameters, count), warnings, _ = _lora(model)
    expected = {f"model.layers.{b}.mlp.{t}" for b in range(2) for t in ("experts.gate_up_proj", "experts.down_proj",
                                                                          "gate.weight")}
    assert set(parameters) == expected and count > 0 and warnings == []
    assert {m.rsplit(".", 1)[1] for m in modules} >= {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_lora_on_moe_refuses_dropout_in_one_line_and_warns_when_experts_are_left_out():
    model = tiny_model("qwen2_moe")
    with pytest.raises(ConfigError, match=r"^lora\.dropout: .*set lora\.dropout: 0$"):
        _lora(model, dropout=0.1)
    with pytest.raises(ConfigError, match=r"^lora\.dropout"):  # Mixtral: peft's own compatibility adds the experts
        _lora(tiny_model("mixtral"), dropout=0.1, target_parameters=[])
    (_, parameters, _), warnings, _ = _lora(model, target_modules=["q_proj"])
    assert parameters == [] and "routed experts" in warnings[0] and "lora.target_parameters" in warnings[0]
    (_, parameters, _), warnings, _ = _lora(model, target_parameters=[])
    assert parameters == [] and warnings == []  # asked for none


def test_hft_with_lora_on_moe_adapts_the_drawn_experts_tensors_and_no_router():
    model = tiny_model("qwen2_moe", layers=4)
    (modules, parameters, _), warnings, summary = _lora(model, trainable={"mode": "hft", "seed": 3})
    mask = summary["parameters"]
    with_experts = {f"model.layers.{b}" for b in range(4) if mask[f"model.layers.{b}.mlp.experts.down_proj"]}
    assert {p.rsplit(".mlp.", 1)[0] for p in parameters} == with_experts
    assert not any(re.search(r"\.gate(\.weight)?$|shared_expert_gate", m) for m in modules + parameters)
    shared = {m.rsplit(".mlp.", 1)[0] for m in modules if ".shared_expert." in m}
    drawn = {f"model.layers.{b}" for b in range(4) if mask[f"model.layers.{b}.mlp.shared_expert.up_proj.weight"]}
    assert shared == drawn
    assert "carry one adapter over all their parts" in warnings[0]
