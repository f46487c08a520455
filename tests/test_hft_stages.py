"""HFT (`trainable: {mode: hft}`) through the real sft and dpo stages, full-weight and with LoRA.

Checked on the outputs, not on the mask function: every frozen tensor is bit-identical to the stage's input
(sha256 of the safetensors tensor), every trained tensor moved, each block trains exactly the documented half
of its projections, the optimizer holds only trained parameters, and the mask is redrawn per stage. With LoRA,
trainable.json, the logged `trained_params` and the report count the adapters the stage saved, not the base.
"""
import hashlib
import json
import re
import types

import pytest
from safetensors.torch import load_file

import posttrain.stages  # noqa: F401
import posttrain.stages.trl_run as trl_run
from evals.run_report import _hft_sections
from posttrain.config import load_pipeline
from posttrain.hft import assert_optimizer_holds_only
from posttrain.pipeline import run_pipeline
from posttrain.stages.common import optimizer_param_names
from posttrain.world.tuning import world_trainer

TINY = {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3, "save_steps": 50}
HFT = {"mode": "hft", "seed": 0}
ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


def _stages(lora: dict | None = None) -> list[dict]:
    extra = {"lora": lora} if lora else {}
    return [
        {"name": "sft_hft", "kind": "sft", "model": "world", "data": [{"source": "arithmetic", "limit": 16}],
         "trainer": world_trainer("sft", **TINY), "trainable": dict(HFT), **extra},
        {"name": "dpo_hft", "kind": "dpo", "data": [{"source": "style", "limit": 16}], "rpo_alpha": 0.5,
         "trainer": world_trainer("dpo", **TINY), "trainable": dict(HFT), **extra},
    ]


def _spy_optimizer(monkeypatch) -> list[dict]:
    """Wrap both stages' metrics callback so that it also records what the optimizer holds, at the first and
    last step (the stages build their trainers internally; a callback is how a test sees the optimizer)."""
    seen: list[dict] = []

    def wrap(original):
        def factory(ctx):
            cb = original(ctx)
            begin, end = cb.on_train_begin, cb.on_train_end  # the stage's own (progress, finite-loss bookkeeping)

            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
                begin(args, state, control, model=model, optimizer=optimizer, **kw)
                held = optimizer_param_names(types.SimpleNamespace(model=model, optimizer=optimizer))
                seen.append({"stage": ctx.index, "held": held,
                             "requires_grad": {n for n, p in model.named_parameters() if p.requires_grad}})

            def on_train_end(self, args, state, control, model=None, optimizer=None, **kw):
                end(args, state, control, model=model, optimizer=optimizer, **kw)
                seen[-1]["checked"] = assert_optimizer_holds_only(optimizer, model)  # also: no state when frozen

            cb.on_train_begin = types.MethodType(on_train_begin, cb)
            cb.on_train_end = types.MethodType(on_train_end, cb)
            return cb

        return factory

    monkeypatch.setattr(trl_run, "metrics_callback", wrap(trl_run.metrics_callback))  # every stage's TRL run
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
    """The same two stages with LoRA, then a plain LoRA sft (`trainable:` left at mode all, `all-linear`)."""
    mp = pytest.MonkeyPatch()
    try:
        seen = _spy_optimizer(mp)
        run_dir = tmp_path_factory.mktemp("hft_lora") / "run"
        plain = {"name": "sft_lora", "kind": "sft", "data": [{"source": "arithmetic", "limit": 16}],
                 "trainer": world_trainer("sft", **TINY), "lora": {"r": 4, "alpha": 8}}
        stages = _stages(lora={"r": 4, "alpha": 8}) + [plain]
        cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": stages})
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
    selected = {n.rsplit(".", 1)[0] for n, on in full["parameters"].items()
                if on and re.search(r"\.(self_attn|mlp)\.", n)}
    # same seed and stage index, another run: the same draw puts the adapters
    assert set(lora["lora"]["modules"]) == selected
    adapter_dir = lora_dir / "stages" / f"{index:02d}_{name}" / "adapter"
    hosts = {re.sub(r"^base_model\.model\.|\.lora_[AB]\.weight$", "", k)
             for k in load_file(adapter_dir / "adapter_model.safetensors")}
    assert hosts == selected
    record = [s for s in seen if s["stage"] == index][0]
    assert record["held"] == record["requires_grad"] and all(".lora_" in n for n in record["held"])
    assert {re.sub(r"^base_model\.model\.|\.lora_[AB]\.default\.weight$", "", n) for n in record["held"]} == selected


def _adapter_numel(stage_dir) -> int:
    return sum(t.numel() for t in load_file(stage_dir / "adapter" / "adapter_model.safetensors").values())


LORA_STAGES = [(1, "sft_hft"), (2, "dpo_hft"), (3, "sft_lora")]


@pytest.mark.parametrize("index, name", LORA_STAGES)
def test_lora_stage_records_the_adapters_it_trained_not_the_base_selection(hft_full, hft_lora, index, name):
    """With LoRA only the adapters train: trainable.json and the logged trained_params count exactly the adapter
    the stage saved, every base parameter is frozen (norms too, though hft's norms switch is on), and the
    total is base + adapter."""
    lora_dir, _ = hft_lora
    out = lora_dir / "stages" / f"{index:02d}_{name}"
    info = json.loads((out / "trainable.json").read_text())
    base = json.loads((hft_full[0] / "stages" / "01_sft_hft" / "trainable.json").read_text())
    base_total = base["trained"] + base["frozen"]
    adapter = _adapter_numel(out)
    assert info["trained"] == info["lora"]["adapter_params"] == adapter > 0
    assert info["frozen"] == base_total
    assert set(info["parameters"]) == set(base["parameters"]) and not any(info["parameters"].values())
    assert info["lora"]["r"] == 4 and info["mode"] == ("all" if name == "sft_lora" else "hft")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["trained_params"] for r in logged if r.get("event") == "data"] == [adapter]
    if name == "sft_lora":  # all-linear: every attention and MLP projection of the world's 4 blocks, not lm_head
        assert len(info["lora"]["modules"]) == 4 * (len(ATTN) + len(MLP))
        assert {m.rsplit(".", 1)[1] for m in info["lora"]["modules"]} == ATTN | MLP


def test_report_says_what_a_lora_stage_trained_and_still_reads_older_files(hft_lora, tmp_path):
    lora_dir, _ = hft_lora
    (section,) = _hft_sections(lora_dir)
    lines = section.splitlines()[2:]
    expected = []
    for index, name in LORA_STAGES:
        info = json.loads((lora_dir / "stages" / f"{index:02d}_{name}" / "trainable.json").read_text())
        n, total = _adapter_numel(lora_dir / "stages" / f"{index:02d}_{name}"), info["trained"] + info["frozen"]
        chosen = "" if name == "sft_lora" else " chosen by mode `hft`"
        expected.append(f"- `{index:02d}_{name}`: LoRA r=4 on {len(info['lora']['modules'])} modules{chosen}: "
                        f"{n:,} adapter parameters trained ({100 * n / total:.1f}% of {total:,}); base weights frozen")
    assert lines == expected
    assert "28 modules: " in lines[2]
    # Files of older run dirs: a non-LoRA stage renders as it always did; a LoRA stage, whose counts were of
    # the `trainable:` selection, shows its targets only.
    older = {"mode": "all", "trained": 918656, "frozen": 0, "parameters": {}}
    for folder, info in [("01_sft", older), ("02_sft_lora", {**older, "lora_target_modules": "all-linear"}),
                         ("03_dpo_lora", {**older, "mode": "hft", "lora_target_modules": ["a.q_proj", "a.v_proj"]})]:
        (tmp_path / "stages" / folder).mkdir(parents=True)
        (tmp_path / "stages" / folder / "trainable.json").write_text(json.dumps(info))
    assert _hft_sections(tmp_path)[0].splitlines()[2:] == [
        "- `01_sft`: mode `all`, trained 918,656 of 918,656 parameters (100.0%)",
        "- `02_sft_lora`: LoRA on `all-linear`, mode `all`: adapter parameters not recorded (an older run); "
        "base weights frozen",
        "- `03_dpo_lora`: LoRA on 2 modules, mode `hft`: adapter parameters not recorded (an older run); "
        "base weights frozen",
    ]
