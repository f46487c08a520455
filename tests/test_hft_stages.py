"""HFT (`trainable: {mode: hft}`) through the real sft and dpo stages, full-weight and with LoRA.

Checked on the outputs, not on the mask function: every frozen tensor is bit-identical to the stage's input
(sha256 of the safetensors tensor), every trained tensor moved, each block trains exactly the documented half
of its projections, the optimizer holds only trained parameters, and the mask is redrawn per stage.
"""
import hashlib
import json
import re
import types

import pytest
from safetensors.torch import load_file

import posttrain.stages  # noqa: F401
import posttrain.stages.dpo as dpo_stage
import posttrain.stages.sft as sft_stage
from posttrain.config import load_pipeline
from posttrain.hft import assert_optimizer_holds_only
from posttrain.pipeline import run_pipeline
from posttrain.stages.common import optimizer_param_names

TINY = {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3, "save_steps": 50}
HFT = {"mode": "hft", "seed": 0}
ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


def _stages(lora: dict | None = None) -> list[dict]:
    extra = {"lora": lora} if lora else {}
    return [
        {"name": "sft_hft", "kind": "sft", "model": "world", "data": [{"source": "arithmetic", "limit": 16}],
         "trainer": dict(TINY), "trainable": dict(HFT), **extra},
        {"name": "dpo_hft", "kind": "dpo", "data": [{"source": "style", "limit": 16}],
         "trainer": dict(TINY), "trainable": dict(HFT), **extra},
    ]


def _spy_optimizer(monkeypatch) -> list[dict]:
    """Wrap both stages' metrics callback so that it also records what the optimizer holds, at the first and
    last step (the stages build their trainers internally; a callback is how a test sees the optimizer)."""
    seen: list[dict] = []

    def wrap(original):
        def factory(ctx):
            cb = original(ctx)

            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
                held = optimizer_param_names(types.SimpleNamespace(model=model, optimizer=optimizer))
                seen.append({"stage": ctx.index, "held": held,
                             "requires_grad": {n for n, p in model.named_parameters() if p.requires_grad}})

            def on_train_end(self, args, state, control, model=None, optimizer=None, **kw):
                seen[-1]["checked"] = assert_optimizer_holds_only(optimizer, model)  # also: no state when frozen

            cb.on_train_begin = types.MethodType(on_train_begin, cb)
            cb.on_train_end = types.MethodType(on_train_end, cb)
            return cb

        return factory

    monkeypatch.setattr(sft_stage, "metrics_callback", wrap(sft_stage.metrics_callback))
    monkeypatch.setattr(dpo_stage, "metrics_callback", wrap(dpo_stage.metrics_callback))
    return seen


def _digests(folder) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in load_file(folder / "model.safetensors").items()}


def _block_modules(mask: dict[str, bool], kinds: set[str]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for name, on in mask.items():
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.weight$", name)
        if m and m[2] in kinds:
            out.setdefault(int(m[1]), set())
            if on:
                out[int(m[1])].add(m[2])
    return out


@pytest.fixture(scope="module")
def hft_full(world, tmp_path_factory):
    """sft (HFT) then dpo (HFT) from the world base, full weights; returns (run dir, optimizer records)."""
    mp = pytest.MonkeyPatch()
    try:
        seen = _spy_optimizer(mp)
        run_dir = tmp_path_factory.mktemp("hft") / "run"
        cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": _stages()})
        run_pipeline(cfg, run_dir, lambda m: None)
    finally:
        mp.undo()
    return run_dir, seen


@pytest.fixture(scope="module")
def hft_lora(world, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        seen = _spy_optimizer(mp)
        run_dir = tmp_path_factory.mktemp("hft_lora") / "run"
        cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": _stages(lora={"r": 4, "alpha": 8})})
        run_pipeline(cfg, run_dir, lambda m: None)
    finally:
        mp.undo()
    return run_dir, seen


STAGES = [(1, "sft_hft", "world"), (2, "dpo_hft", "01_sft_hft")]


@pytest.mark.parametrize("index, name, source", STAGES)
def test_frozen_tensors_bit_identical_and_trained_tensors_moved(hft_full, world, index, name, source):
    run_dir, _ = hft_full
    out = run_dir / "stages" / f"{index:02d}_{name}"
    before = _digests(world / "base" if source == "world" else run_dir / "stages" / source / "model")
    after = _digests(out / "model")
    mask = json.loads((out / "trainable.json").read_text())["parameters"]
    assert set(mask) == set(before) == set(after)  # untied world model: one safetensors key per parameter
    frozen_moved = [n for n, on in mask.items() if not on and before[n] != after[n]]
    trained_still = [n for n, on in mask.items() if on and before[n] == after[n]]
    assert not frozen_moved and not trained_still, (frozen_moved, trained_still)


@pytest.mark.parametrize("index, name, source", STAGES)
def test_exactly_the_documented_half_of_each_block_trains(hft_full, index, name, source):
    run_dir, _ = hft_full
    info = json.loads((run_dir / "stages" / f"{index:02d}_{name}" / "trainable.json").read_text())
    mask = info["parameters"]
    assert info["mode"] == "hft" and info["stage_index"] == index and info["seed"] == 0
    attn, mlp = _block_modules(mask, ATTN), _block_modules(mask, MLP)
    assert len(attn) == len(mlp) == 4  # the world's 4 blocks
    assert all(len(mods) == 2 for mods in attn.values())  # 2 of 4 attention projections, exactly
    assert all(len(mods) in (1, 2) for mods in mlp.values())  # stochastic rounding of 1.5 of 3
    # Documented defaults: norms train, embeddings and lm_head stay frozen.
    assert all(on for n, on in mask.items() if "norm" in n)
    assert not mask["model.embed_tokens.weight"] and not mask["lm_head.weight"]


def test_optimizer_holds_only_trained_parameters(hft_full):
    _, seen = hft_full
    assert [s["stage"] for s in seen] == [1, 2]
    for record in seen:
        assert record["held"] == record["requires_grad"] == record["checked"]


def test_new_stage_redraws_the_mask(hft_full):
    run_dir, _ = hft_full
    masks = [json.loads((run_dir / "stages" / f"{i:02d}_{n}" / "trainable.json").read_text())["parameters"]
             for i, n, _ in STAGES]
    assert masks[0] != masks[1]


@pytest.mark.parametrize("index, name, source", STAGES)
def test_same_seed_same_stage_same_mask_and_lora_only_on_selected_modules(hft_full, hft_lora, index, name, source):
    full_dir, _ = hft_full
    lora_dir, seen = hft_lora
    full = json.loads((full_dir / "stages" / f"{index:02d}_{name}" / "trainable.json").read_text())
    lora = json.loads((lora_dir / "stages" / f"{index:02d}_{name}" / "trainable.json").read_text())
    assert lora["parameters"] == full["parameters"]  # same seed and stage index, another run: same draw
    selected = {n.rsplit(".", 1)[0] for n, on in full["parameters"].items()
                if on and re.search(r"\.(self_attn|mlp)\.", n)}
    assert set(lora["lora_target_modules"]) == selected
    adapter_dir = lora_dir / "stages" / f"{index:02d}_{name}" / "adapter"
    hosts = {re.sub(r"^base_model\.model\.|\.lora_[AB]\.weight$", "", k)
             for k in load_file(adapter_dir / "adapter_model.safetensors")}
    assert hosts == selected
    record = [s for s in seen if s["stage"] == index][0]
    assert record["held"] == record["requires_grad"] and all(".lora_" in n for n in record["held"])
    assert {re.sub(r"^base_model\.model\.|\.lora_[AB]\.default\.weight$", "", n) for n in record["held"]} == selected
