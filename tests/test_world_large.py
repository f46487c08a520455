"""`world-large` (posttrain/world/large.py), the claims' ~11M world base: its shape, its registration, and that
no test builds it (only `make claims` does, once, in ~10 minutes)."""
from __future__ import annotations

from pathlib import Path

import pytest

import posttrain.world
from posttrain.config import load_pipeline
from posttrain.registry import WORLD_MODELS
from posttrain.world import large

REPO = Path(__file__).resolve().parent.parent
MERGE_METHODS = REPO / "configs" / "pipelines" / "claims" / "merge_methods.yaml"


def test_parameter_count_is_between_8_and_30_million():
    n = large.n_params()
    assert 8e6 <= n <= 30e6
    # The world's vocabulary, and wider than the 1M world in every layer (the point of a second base).
    cfg = large.model_config()
    assert cfg.vocab_size == 512 and cfg.hidden_size > 128 and cfg.num_hidden_layers >= 4


def test_name_resolves_to_the_large_builder_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    assert WORLD_MODELS.get("world-large") is large.world_large
    with posttrain.world.only_built(), pytest.raises(posttrain.world.NotBuilt, match="world-large"):
        large.world_large(log=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # nothing built, not even the lock or the cache folder


def test_claim_4_pipeline_trains_its_specialists_from_world_large():
    cfg = load_pipeline(MERGE_METHODS)
    stages = {s.name: s for s in cfg.stages}
    assert list(stages) == ["spec_arithmetic", "spec_reversal", "linear", "task_arithmetic", "ties", "dare_linear",
                            "breadcrumbs"]
    assert {s.model for s in stages.values()} == {"world-large"}
    assert [d.source for d in stages["spec_arithmetic"].data] == ["arithmetic"]
    assert [d.source for d in stages["spec_reversal"].data] == ["reversal"]
    assert stages["spec_arithmetic"].trainer == stages["spec_reversal"].trainer  # one rule for both
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "breadcrumbs"):
        merge = stages[name]
        assert merge.method == name and merge.params == {}  # the registered defaults
        assert [m.model for m in merge.models] == ["${stages.spec_arithmetic.model}", "${stages.spec_reversal.model}"]
    assert cfg.eval.suite == "world" and cfg.eval.limit is None  # full test splits
