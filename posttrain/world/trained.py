"""Named world models made by running a stage once and caching its output (e.g. `world-sft`).

DPO and GRPO start from the world's SFT model, merge needs specialists, transfer needs a fine-tuned source:
each is a one-stage pipeline run into `<cache>/world-<VERSION>/models/<name>-<hash>/` on first use (under a
lock, so two processes train it once), and referenced afterwards by name like any model (`model: world-sft`).
`<hash>` is 8 hex digits of the sha256 of the recipe's stage config with every default filled in, so changing
a recipe (or a stage default it leaves unset) trains a new model instead of reusing the old one.
"""
from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Callable

from posttrain import pipeline, world  # through the modules: tests replace run_pipeline and world_dir
from posttrain.config import load_pipeline
from posttrain.registry import WORLD_MODELS
from posttrain.rundir import sha256_json
from posttrain.world.tuning import world_trainer

# name -> one stage's config (a dict as in a pipeline YAML). Eval is off: these are inputs, not results. Each
# states the world's SFT trainer block: the class defaults are for real models.
RECIPES: dict[str, dict] = {
    "world-sft": {"kind": "sft", "model": "world", "data": [{"source": "arithmetic"}, {"source": "facts"}],
                  "trainer": world_trainer("sft")},
    "world-sft-arithmetic": {"kind": "sft", "model": "world", "data": [{"source": "arithmetic"}],
                             "trainer": world_trainer("sft")},
    "world-sft-reversal": {"kind": "sft", "model": "world", "data": [{"source": "reversal"}],
                           "trainer": world_trainer("sft")},
}


def _pipeline(name: str, recipe: dict):
    return load_pipeline(None, data={"name": name, "eval": {"enabled": False},
                                     "stages": [{**recipe, "name": name}]})


def cache_key(name: str, recipe: dict | None = None) -> str:
    """`<name>-<8 hex>`: the cache folder of RECIPES[name] (or of `recipe`), keyed by its resolved config."""
    stage = _pipeline(name, RECIPES[name] if recipe is None else recipe).stages[0]
    return f"{name}-{sha256_json(stage.model_dump(mode='json'))[:8]}"


def trained_model(name: str, log: Callable[[str], None] = print) -> Path:
    """Run RECIPES[name] once into the cache and return its model folder."""
    root = world.world_dir(log) / "models"
    key = cache_key(name)
    run = root / key
    model = run / "stages" / f"01_{name}" / "model"
    if (run / "READY").is_file():
        return model
    world.refuse_build(key)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "READY").is_file():
            log(f"world: training {name} once (cached in {run})")
            pipeline.run_pipeline(_pipeline(name, RECIPES[name]), run, log)
            (run / "READY").write_text("ok\n")
    return model


for _name in RECIPES:
    WORLD_MODELS.register(_name, lambda log=print, _n=_name: trained_model(_n, log))
