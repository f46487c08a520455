"""The shipped demos (`make stage=<kind>`, configs/stages/): each names in `trains_on` only what it trains, so
the report counts everything else that falls as forgetting (issue 18: transfer listed world_facts, which fell)."""
from __future__ import annotations

import pytest

import posttrain.stages  # noqa: F401  (registers the stage kinds)
from posttrain.config import stage_pipeline
from tests.conftest import REPO

# What each demo trains: a trainable stage the world task of its training data (not its rehearsal), a merge
# what its specialists trained, a transfer what the carried fine-tune delivers on world-v2 (arithmetic).
TRAINS = {"sft": ["world_arithmetic"], "dpo": ["world_style"], "grpo": ["world_verifiable"],
          "merge": ["world_style", "world_verifiable"], "transfer": ["world_arithmetic"]}


@pytest.mark.parametrize("kind", sorted(TRAINS))
def test_shipped_stage_config_trains_on_only_what_it_trains(kind):
    stage = stage_pipeline(kind, REPO / "configs" / "stages" / f"{kind}.yaml", None).stages[0]
    assert stage.trains_on == TRAINS[kind]
    data = getattr(stage, "data", None)
    if data is not None:  # trainable: every trained task is a world task its data holds
        assert set(stage.trains_on) <= {f"world_{src.source}" for src in data}


def test_merge_demo_merges_the_dpo_and_grpo_demos_as_specialists():
    from posttrain.world.trained import RECIPES

    stage = stage_pipeline("merge", REPO / "configs" / "stages" / "merge.yaml", None).stages[0]
    assert (stage.method, stage.base) == ("task_arithmetic", "world-sft")
    assert [m.model for m in stage.models] == ["world-dpo-style", "world-grpo-verifiable"]
    assert [RECIPES[m.model]["kind"] for m in stage.models] == ["dpo", "grpo"]
    assert all(RECIPES[m.model]["model"] == stage.base for m in stage.models)  # task vectors from one model
