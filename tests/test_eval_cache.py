"""Evals cached by content across run dirs (evals/cache.py): a second run of the same models and eval settings
calls lm-eval for nothing; a changed model file or eval setting is evaluated again."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from posttrain.config import EvalConfig, load_pipeline
from posttrain.pipeline import run_pipeline


@pytest.fixture
def lm_eval_calls(tmp_path, monkeypatch):
    """The cache on, in a fresh folder; lm-eval stubbed, each call's model folder recorded."""
    import evals.runner

    monkeypatch.setenv("POSTTRAIN_EVAL_CACHE", str(tmp_path / "eval-cache"))
    calls: list[str] = []

    def fake(model_dir, spec, include, limit, settings, log, **kw):
        calls.append(str(model_dir))
        return {"scores": {"world_arithmetic/exact_match": {"value": 0.25 + 0.25 * len(calls), "stderr": 0.01}},
                "seconds": 1.0, "backend": "hf", "lm_eval": {}, "task_configs": {}}

    monkeypatch.setattr(evals.runner, "_run_lm_eval", fake)
    return calls


def _merge_run(base, a, run_dir, limit=2):
    """A first-stage task-arithmetic merge (three evals: its base, its input, the merge), cheap on tiny models."""
    stage = {"name": "m", "kind": "merge", "method": "task_arithmetic", "base": str(base),
             "models": [{"model": str(a), "weight": 0.5}]}
    run_pipeline(load_pipeline(None, data={"eval": {"limit": limit}, "stages": [stage]}), run_dir, lambda m: None)
    return {f: json.loads((run_dir / "stages" / f / "eval.json").read_text()) for f in ("00_base", "01_m")}


def test_a_second_run_dir_reuses_the_evals_and_a_changed_file_or_setting_misses(world, merge_trio, tmp_path,
                                                                                lm_eval_calls):
    base, a, _ = merge_trio
    first = _merge_run(base, a, tmp_path / "r1")
    # base row, the merge's input as a reference row, then the merge
    assert lm_eval_calls == [str(base), str(a), str(tmp_path / "r1" / "stages" / "01_m" / "model")]

    second = _merge_run(base, a, tmp_path / "r2")
    assert len(lm_eval_calls) == 3  # no lm-eval call: both evals came from the cache
    for folder in ("00_base", "01_m"):
        assert second[folder]["scores"] == first[folder]["scores"]
        assert second[folder]["key"] == first[folder]["key"]
    assert second["01_m"]["model"] == str(tmp_path / "r2" / "stages" / "01_m" / "model")
    assert second["01_m"]["cached_from"] == str(tmp_path / "r1" / "stages" / "01_m" / "model")

    # One changed weight file of an input model: it and the merge miss; the base still hits.
    a2 = shutil.copytree(a, tmp_path / "a2")
    shard = sorted(a2.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, shard, metadata={"format": "pt"})
    _merge_run(base, a2, tmp_path / "r3")
    assert lm_eval_calls[3:] == [str(a2), str(tmp_path / "r3" / "stages" / "01_m" / "model")]

    # A changed eval setting misses for every model.
    _merge_run(base, a, tmp_path / "r4", limit=3)
    assert lm_eval_calls[5:] == [str(base), str(a), str(tmp_path / "r4" / "stages" / "01_m" / "model")]


def test_cache_off_and_hub_models_are_never_stored(world, tmp_path, monkeypatch, lm_eval_calls):
    from evals.runner import evaluate_model

    settings = EvalConfig(limit=2)
    for _ in range(2):
        evaluate_model("org/model", settings=settings, log=lambda m: None)  # a hub name: its files are unknown
    assert lm_eval_calls == ["org/model", "org/model"]

    monkeypatch.setenv("POSTTRAIN_EVAL_CACHE", "off")
    for _ in range(2):
        evaluate_model(str(world / "base"), settings=settings, log=lambda m: None)
    assert lm_eval_calls[2:] == [str(world / "base")] * 2
    assert not (tmp_path / "eval-cache").exists()
