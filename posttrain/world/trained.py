"""Named world models made by running a stage once and caching its output (e.g. `world-sft`).

DPO and GRPO start from the world's SFT model, merge needs specialists, transfer needs a fine-tuned source:
each is a one-stage pipeline run into `<cache>/world-<VERSION>/models/<name>-<hash>/` on first use (under a
lock, so two processes train it once), and referenced afterwards by name like any model (`model: world-sft`).
`<hash>` is 8 hex digits of the sha256 of the recipe's stage config with every default filled in (and of the
keys of the named models it starts from), so changing a recipe (or a stage default it leaves unset, or the
recipe of the model it starts from) trains a new model instead of reusing the old one.
"""
from __future__ import annotations

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
    # The merge demo's specialists (configs/stages/merge.yaml): configs/stages/dpo.yaml and grpo.yaml as
    # stages of their own, both from world-sft with small updates (SGD steps; GRPO at lr 5e-5), so their
    # task vectors are small and task arithmetic of the two onto world-sft keeps both skills.
    "world-dpo-style": {"kind": "dpo", "model": "world-sft", "rehearsal": [{"source": "arithmetic"}],
                        "rpo_alpha": 0.5, "trainer": world_trainer(
                            "dpo", learning_rate=0.1, max_steps=300, logging_steps=20, save_steps=150)},
    "world-grpo-verifiable": {"kind": "grpo", "model": "world-sft", "data": [{"source": "verifiable"}],
                              "rewards": [{"name": "numeric_match"}], "max_completion_length": 8,
                              "trainer": world_trainer("grpo")},
}


def _pipeline(name: str, recipe: dict):
    return load_pipeline(None, data={"name": name, "eval": {"enabled": False},
                                     "stages": [{**recipe, "name": name}]})


def cache_key(name: str, recipe: dict | None = None) -> str:
    """`<name>-<8 hex>`: the cache folder of RECIPES[name] (or of `recipe`), keyed by its resolved config and,
    for a recipe that starts from another recipe's model (`model: world-sft`), by that model's key too, so a
    retrained world-sft retrains the specialists made from it. A recipe from the world base keeps the key of
    its config alone (as before: caches already built stay valid); the base is keyed by the world's version."""
    stage = _pipeline(name, RECIPES[name] if recipe is None else recipe).stages[0]
    config = stage.model_dump(mode="json")
    inputs = [cache_key(ref) for ref in (stage.model, *stage.other_inputs()) if ref in RECIPES and ref != name]
    return f"{name}-{sha256_json({'config': config, 'inputs': inputs} if inputs else config)[:8]}"


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
        world.wait_for_lock(lock, f"world: another process is training {name}; waiting for it", log)
        if not (run / "READY").is_file():
            log(f"world: training {name} once (cached in {run})")
            pipeline.run_pipeline(_pipeline(name, RECIPES[name]), run, log)
            (run / "READY").write_text("ok\n")
    return model


for _name in RECIPES:
    WORLD_MODELS.register(_name, lambda log=print, _n=_name: trained_model(_n, log))
