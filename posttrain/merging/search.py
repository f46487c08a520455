"""Coefficient search for the merge stage: try coefficients, score each merge on a dev split, keep the best.

    search:
      method: grid                       # grid: every point of space^n; random: `trials` draws
      space: [0.3, 0.6, 1.0]             # values a coefficient may take; random also takes {low: 0, high: 1.5}
      scope: per_model                   # per_model: one per model | shared: one for all | per_block: aTLAS
      metric: world_arithmetic/exact_match
      split: dev                         # never test: the report's numbers must not choose the merge
      trials: 8

Each trial writes a full candidate merge to ``<work_dir>/search/trial_NNN/``, scores it with the scorer (by
default the eval suite on the dev split, one task: ``posttrain.stages.combine.eval_scorer``), appends one JSON
line to ``<work_dir>/search.jsonl`` and keeps the folder only while it is the best so far; the last line of
``search.jsonl`` is the best trial (``"best": true``), whose folder becomes the stage's ``model/`` (merge and
transfer both end this way). Ties keep the earlier trial; a NaN score never wins.

Per-block search follows aTLAS (Zhang et al. 2024), one coefficient per model per block, but searches instead
of learning the coefficients by gradient descent, so it only suits a few blocks or a random search.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from posttrain.schema import ConfigError, Strict

__all__ = ["SearchRange", "SearchConfig", "Coefficients", "Trial", "candidates", "grid_size", "run_search"]

Scorer = Callable[[Path], float]  # a candidate model folder -> its score on search.metric
_MAX_GRID = 4096  # beyond this a grid is a mistake (3 values, 2 models, 4 blocks is already 6,561 points)


class SearchRange(Strict):
    """A continuous interval for random search: each coefficient is drawn uniformly from [low, high]."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if self.low > self.high:
            raise ValueError(f"search.space: low ({self.low}) is above high ({self.high})")
        return self


class SearchConfig(Strict):
    """Coefficient search: replaces the models' `weight` (and `per_block`) by the best point found."""

    method: Literal["grid", "random"] = "grid"
    space: list[float] | SearchRange = Field(default_factory=lambda: [0.5, 1.0])
    scope: Literal["per_model", "shared", "per_block"] = "per_model"
    metric: str = Field(..., pattern=r"^[^/\s]+/\S+$", description="<task>/<metric>, a key of the eval scores")
    split: Literal["dev"] = Field("dev", description="only dev: test is what the report shows")
    trials: int | None = Field(None, ge=1, description="random: draws; grid: the most points allowed")
    mode: Literal["max", "min"] = "max"
    suite: str = "world"
    limit: int | None = Field(100, ge=1, description="examples per trial eval (None = all)")
    seed: int | None = Field(None, description="random draws; None: the pipeline's seed")

    @model_validator(mode="after")
    def _method_fits_space(self) -> SearchConfig:
        if isinstance(self.space, list) and not self.space:
            raise ValueError("search.space: give at least one value")
        if self.method == "grid" and not isinstance(self.space, list):
            raise ValueError("search.space: grid search needs a list of values, not a {low, high} range")
        if self.method == "random" and self.trials is None:
            raise ValueError("search.trials: random search needs a number of trials")
        return self

    @property
    def task(self) -> str:
        return self.metric.split("/", 1)[0]


@dataclass(frozen=True)
class Coefficients:
    """One point: global weights (one per model) and, for per-block merges, {block: one per model}."""

    weights: list[float]
    per_block: dict[str, list[float]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"weights": self.weights, "per_block": self.per_block}


@dataclass
class Trial:
    index: int
    coefficients: Coefficients
    score: float
    model_dir: Path


def _dims(scope: str, n_models: int, n_blocks: int) -> int:
    return {"shared": 1, "per_model": n_models, "per_block": n_models * n_blocks}[scope]


def grid_size(search: SearchConfig, n_models: int, n_blocks: int = 1) -> int:
    """Number of grid points, or 0 for a continuous space."""
    if not isinstance(search.space, list):
        return 0
    return len(search.space) ** _dims(search.scope, n_models, n_blocks)


def check_grid(search: SearchConfig, n_models: int, n_blocks: int = 1) -> None:
    """Refuse a grid larger than `trials` (or than _MAX_GRID): a truncated grid would search a biased corner."""
    if search.method != "grid":
        return
    size = grid_size(search, n_models, n_blocks)
    cap = search.trials if search.trials is not None else _MAX_GRID
    if size > cap:
        raise ConfigError(
            f"search: the {search.scope} grid has {size} points ({len(search.space)} values, "  # type: ignore[arg-type]
            f"{_dims(search.scope, n_models, n_blocks)} coefficients) but at most {cap} are allowed; "
            "use method: random with trials: N, or fewer values"
        )


def candidates(search: SearchConfig, n_models: int, blocks: list[str], seed: int) -> list[Coefficients]:
    """The points to try, in order. Grid: itertools.product order. Random: seeded draws, repeats skipped."""
    n_blocks = len(blocks) if search.scope == "per_block" else 1
    check_grid(search, n_models, n_blocks)
    dims = _dims(search.scope, n_models, n_blocks)
    if search.method == "grid":
        values = [float(v) for v in search.space]  # type: ignore[union-attr]  (grid: a list, checked above)
        points = [list(p) for p in itertools.product(values, repeat=dims)]
    else:
        points = _random_points(search, dims, seed)
    return [_expand(p, search.scope, n_models, blocks) for p in points]


def _random_points(search: SearchConfig, dims: int, seed: int) -> list[list[float]]:
    rng = random.Random(search.seed if search.seed is not None else seed)
    space = search.space
    assert search.trials is not None  # checked by SearchConfig
    want = search.trials
    if isinstance(space, list):
        want = min(want, len(set(space)) ** dims)  # a discrete space may hold fewer distinct points than trials
    points: list[list[float]] = []
    seen: set[tuple[float, ...]] = set()
    for _ in range(want * 50):
        if len(points) == want:
            break
        if isinstance(space, list):
            p = [float(rng.choice(space)) for _ in range(dims)]
        else:
            p = [round(rng.uniform(space.low, space.high), 6) for _ in range(dims)]
        if tuple(p) not in seen:
            seen.add(tuple(p))
            points.append(p)
    return points


def _expand(point: list[float], scope: str, n_models: int, blocks: list[str]) -> Coefficients:
    if scope == "shared":
        return Coefficients([point[0]] * n_models)
    if scope == "per_model":
        return Coefficients(list(point))
    # block-major: point[b * n_models : (b + 1) * n_models] are block b's coefficients, one per model.
    per_block = {b: list(point[i * n_models : (i + 1) * n_models]) for i, b in enumerate(blocks)}
    return Coefficients([1.0] * n_models, per_block)


def _better(score: float, best: Trial | None, mode: str) -> bool:
    if best is None:
        return True
    if math.isnan(score):
        return False
    if math.isnan(best.score):
        return True
    return score > best.score if mode == "max" else score < best.score


def run_search(
    search: SearchConfig,
    points: list[Coefficients],
    build: Callable[[Coefficients, Path], None],
    score: Scorer,
    work_dir: Path,
    out: Path,
    log: Callable[[str], None] = print,
) -> tuple[Coefficients, dict[str, Any]]:
    """Build, score and record every point; move the best candidate to `out` and remove the trials' folder.

    Returns the best coefficients and the metrics a stage records (trials, best trial, metric, best score).
    """
    if not points:
        raise ConfigError("search: no coefficients to try")
    trials_dir = work_dir / "search"
    record = work_dir / "search.jsonl"
    shutil.rmtree(trials_dir, ignore_errors=True)  # an interrupted earlier attempt; trials are not resumed
    record.unlink(missing_ok=True)
    trials_dir.mkdir(parents=True)
    best: Trial | None = None
    for i, coeffs in enumerate(points):
        candidate = trials_dir / f"trial_{i:03d}"
        build(coeffs, candidate)
        value = float(score(candidate))
        _append(record, {"trial": i, **coeffs.to_json(), "metric": search.metric, "split": search.split,
                         "score": value if math.isfinite(value) else None})
        log(f"merge search: trial {i + 1}/{len(points)} {coeffs.to_json()} -> {search.metric}={value:.4f}")
        if _better(value, best, search.mode):
            if best is not None:
                shutil.rmtree(best.model_dir, ignore_errors=True)
            best = Trial(i, coeffs, value, candidate)
        else:
            shutil.rmtree(candidate, ignore_errors=True)
    assert best is not None
    _append(record, {"best": True, "trial": best.index, **best.coefficients.to_json(), "metric": search.metric,
                     "split": search.split, "score": best.score if math.isfinite(best.score) else None})
    log(f"merge search: best is trial {best.index + 1} ({search.metric}={best.score:.4f})")
    os.replace(best.model_dir, out)
    shutil.rmtree(trials_dir, ignore_errors=True)
    return best.coefficients, {"search_trials": len(points), "search_best_trial": best.index,
                               "search_metric": search.metric,
                               "search_best_score": best.score if math.isfinite(best.score) else None}


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
