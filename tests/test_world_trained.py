"""The cache of named world models (posttrain/world/trained.py): one folder per recipe, keyed by its hash."""
from __future__ import annotations

import re

import pytest

import posttrain.pipeline
import posttrain.world
from posttrain.world import trained
from posttrain.world.trained import RECIPES, cache_key, trained_model


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cache_key_is_name_and_8_hex(name):
    assert re.fullmatch(re.escape(name) + r"-[0-9a-f]{8}", cache_key(name))


def test_same_recipe_same_key_changed_recipe_new_key():
    name = "world-sft-arithmetic"
    key = cache_key(name)
    assert cache_key(name) == key
    assert cache_key(name, {**RECIPES[name]}) == key
    for changed in ({**RECIPES[name], "trainer": {"learning_rate": 1e-5}},
                    {**RECIPES[name], "data": [{"source": "facts"}]},
                    {**RECIPES[name], "lora": {"r": 4}}):
        assert cache_key(name, changed) != key
    # The key hashes the resolved config: writing a default out is the same recipe.
    assert cache_key("world-sft", {**RECIPES["world-sft"], "assistant_only_loss": True}) == cache_key("world-sft")


def test_trained_model_trains_once_per_recipe(tmp_path, monkeypatch):
    calls = []

    def fake_run(cfg, run, log):
        calls.append(run.name)
        (run / "stages" / f"01_{cfg.stages[0].name}" / "model").mkdir(parents=True)

    monkeypatch.setattr(posttrain.world, "world_dir", lambda log=print: tmp_path)
    monkeypatch.setattr(posttrain.pipeline, "run_pipeline", fake_run)
    name = "world-sft-reversal"
    first = trained_model(name, log=lambda _: None)
    assert trained_model(name, log=lambda _: None) == first  # cached: trained once
    assert first == tmp_path / "models" / cache_key(name) / "stages" / f"01_{name}" / "model"
    assert calls == [cache_key(name)]

    monkeypatch.setitem(trained.RECIPES, name, {**RECIPES[name], "trainer": {"learning_rate": 1e-5}})
    second = trained_model(name, log=lambda _: None)
    assert second != first and second.is_dir() and first.is_dir()  # a changed recipe trains anew beside the old
    assert len(calls) == 2


def test_a_specialist_of_world_sft_is_keyed_by_world_sft_too(monkeypatch):
    """The merge demo's specialists start from world-sft: a changed world-sft recipe must retrain them, while
    the recipes from the world base keep their keys."""
    before = {name: cache_key(name) for name in RECIPES}
    monkeypatch.setitem(trained.RECIPES, "world-sft", {**RECIPES["world-sft"], "trainer": {"learning_rate": 1e-5}})
    after = {name: cache_key(name) for name in RECIPES}
    changed = {name for name in RECIPES if after[name] != before[name]}
    assert changed == {"world-sft"} | {n for n, r in RECIPES.items() if r.get("model") == "world-sft"}
    assert {"world-dpo-style", "world-grpo-verifiable"} <= changed
