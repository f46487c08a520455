"""KTO stage (the stage kind added in one file): config checks, unpaired row order, a few steps on the world
through `posttrain stage kto` (loss 0.5 at init, every parameter moves, the folder loads), and HFT and LoRA
on it as on DPO (frozen tensors bit-identical, no reference copy with LoRA)."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

import posttrain.stages  # noqa: F401
from posttrain.cli import REPO_CONFIGS, main
from posttrain.config import ConfigError, load_pipeline, stage_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.registry import STAGES
from posttrain.stages.kto import KTOStageConfig, unpaired_rows

TINY = {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3,
        "save_steps": 50, "max_length": 96, "gradient_checkpointing": False, "extra": {"optim": "sgd"}}


def _metrics(stage_dir):
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_kto_is_registered_from_its_own_file_with_trls_defaults():
    from trl import KTOConfig

    cfg = STAGES.get("kto").config()
    assert STAGES.get("kto").config is KTOStageConfig and cfg.kind == "kto"
    trl = KTOConfig(output_dir="unused", use_cpu=True)
    assert (cfg.trainer.learning_rate, cfg.beta, cfg.loss_type, cfg.desirable_weight, cfg.undesirable_weight) == (
        trl.learning_rate, trl.beta, trl.loss_type, trl.desirable_weight, trl.undesirable_weight)
    assert [s.source for s in cfg.data] == ["style"]


def test_a_batch_of_one_is_refused_before_any_model_loads():
    with pytest.raises(ConfigError, match=r"stages\[0\].*per_device_train_batch_size must be at least 2"):
        load_pipeline(None, data={"stages": [{"kind": "kto", "trainer": {"per_device_train_batch_size": 1}}]})


def test_pairs_unpair_into_alternating_labels_with_no_pair_neighbours():
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(4)]
    rows = unpaired_rows(pairs)
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("p0", "c0", True), ("p1", "r1", False), ("p2", "c2", True), ("p3", "r3", False),
        ("p0", "r0", False), ("p1", "c1", True), ("p2", "r2", False), ("p3", "c3", True)]
    assert all(a["prompt"] != b["prompt"] for a, b in zip(rows, rows[1:]))


def test_make_stage_kto_config_states_the_world_tuning():
    stage = stage_pipeline("kto", REPO_CONFIGS / "stages" / "kto.yaml", []).stages[0]
    assert stage.kind == "kto" and stage.model == "world-sft" and stage.trains_on == ["world_style"]
    assert stage.trainer.extra == {"optim": "sgd"} and stage.trainer.learning_rate > 1e-6


def test_posttrain_stage_kto_trains_every_parameter_from_loss_one_half(world, tmp_path):
    """`make stage=kto` runs `posttrain stage kto` on configs/stages/kto.yaml; here with a few steps."""
    sets = ["eval.enabled=false", "model=world", "data=[{source: style, limit: 16}]",
            "trainer.max_steps=3", "trainer.per_device_train_batch_size=4", "trainer.logging_steps=1"]
    assert main(["stage", "kto", "--run-dir", str(tmp_path / "r"), *[a for s in sets for a in ("--set", s)]]) == 0
    out = tmp_path / "r" / "stages" / "01_kto"
    logs = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2, 3]
    # Step 1 runs before any update: policy == reference, so every log-ratio and the KL estimate are 0 and each
    # row costs 1 - sigmoid(0) = 0.5, desirable or not.
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    base = load_file(world / "base" / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    unchanged = [k for k in base if torch.equal(base[k], after[k])]
    assert set(base) == set(after) and not unchanged, unchanged
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out / "model"), AutoTokenizer.from_pretrained(out / "model")
    ids = tok("Tell me the", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def _digests(folder) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in load_file(folder / "model.safetensors").items()}


def test_hft_freezes_its_half_and_lora_loads_no_reference_copy(world, tmp_path, monkeypatch):
    import posttrain.stages.trl_run as trl_run

    loads = []
    real = trl_run.load_model
    monkeypatch.setattr(trl_run, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    data = [{"source": "style", "limit": 8}]
    stages = [{"name": "kto_hft", "kind": "kto", "model": "world", "data": data, "trainer": TINY,
               "trainable": {"mode": "hft", "seed": 0}},
              {"name": "kto_lora", "kind": "kto", "model": "world", "data": data, "trainer": TINY,
               "lora": {"r": 4, "alpha": 8}}]
    run_pipeline(load_pipeline(None, data={"eval": {"enabled": False}, "stages": stages}), tmp_path / "r",
                 lambda m: None)
    assert len(loads) == 3  # HFT: policy and reference; LoRA: the policy only
    out = tmp_path / "r" / "stages" / "01_kto_hft"
    before, after = _digests(world / "base"), _digests(out / "model")
    mask = json.loads((out / "trainable.json").read_text())["parameters"]
    assert set(mask) == set(before) == set(after) and 0 < sum(mask.values()) < len(mask)
    assert [n for n, on in mask.items() if not on and before[n] != after[n]] == []  # frozen: bit-identical
    assert [n for n, on in mask.items() if on and before[n] == after[n]] == []  # trained: moved
    lora = tmp_path / "r" / "stages" / "02_kto_lora"
    assert (lora / "adapter" / "adapter_config.json").is_file()
    assert _digests(lora / "model") != before  # the merged adapters changed the weights
    first = [r for r in _metrics(lora) if "loss" in r][0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-5)  # fresh adapters (B = 0): policy == reference


def test_unpaired_rows_train_as_kto_reads_them(world, tmp_path, monkeypatch):
    """KTO's own rows ({prompt, completion, label}) and pairs in one stage: the trainer gets every unpaired row
    once and each pair as two rows, labels alternating (every batch of two holds both); a label that is not
    true/false is refused naming the file, the row and the column."""
    from posttrain.data import DataError
    from posttrain.stages.kto import kto_order

    singles = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 3 != 0} for i in range(6)]
    pairs = [{"prompt": f"p{i}", "chosen": f"Certainly! {i}", "rejected": f"{i}"} for i in range(2)]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in singles + pairs))
    seen = {}

    def capture(cfg, ctx, trl, dataset, *args, **kwargs):  # the rows TRL would get; no training
        seen["d"] = dataset
        raise KeyboardInterrupt

    import posttrain.stages.kto as kto

    monkeypatch.setattr(kto, "run_trl_stage", capture)
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [
        {"kind": "kto", "model": "world", "data": [{"source": str(data)}], "trainer": TINY}]})
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / "r", lambda m: None)
    rows = list(seen["d"])
    assert len(rows) == len(singles) + 2 * len(pairs)
    texts = sorted(r["completion"][-1]["content"] for r in rows)
    assert texts == sorted([s["completion"] for s in singles] + [p[k] for p in pairs for k in ("chosen", "rejected")])
    labels = [r["label"] for r in kto_order(singles)]
    assert labels == [True, False, True, False, True, True]  # 4 desirable, 2 undesirable: alternating, then the rest
    data.write_text(json.dumps({"prompt": "q", "completion": "a", "label": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"kto\.jsonl row 1: 'label' must be true \(desirable\) or false"):
        run_pipeline(cfg, tmp_path / "r2", lambda m: None)
