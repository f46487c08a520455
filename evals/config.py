"""The eval block: the one set of eval settings every stage's evaluation (base included) runs with, so every
delta compares like with like."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from posttrain.schema import Strict


class EvalConfig(Strict):
    """The one eval block shared by every stage kind; the same settings run on base and after every stage."""

    enabled: bool = True
    suite: str = "world"
    limit: int | None = Field(100, ge=1, description="examples per task (None = all)")
    batch_size: int = Field(32, ge=1)
    backend: Literal["auto", "hf", "vllm"] = "auto"
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="backend vllm: vLLM's share of the GPU's memory (vLLM's own default, 0.9, "
                                     "refuses to start when less is free)")
    seed: int = 0
    num_fewshot: int = Field(0, ge=0)
    max_new_tokens: int = Field(24, ge=1)
    log_samples: bool = Field(False, description="keep each example's score in eval.json (`items`), for paired "
                                                 "tests between models (experiments/claims.py)")
    max_drop: dict[str, float] = Field(default_factory=dict, description="task -> allowed drop below base")
    on_drop: Literal["stop", "warn", "mitigate"] = Field(
        "stop", description="a stage past max_drop: stop the run, warn, or mitigate (interpolate with its parent)")
    mitigate_alphas: list[float] = Field(
        default_factory=lambda: [0.9, 0.75, 0.5, 0.25], min_length=1,
        description="on_drop: mitigate: the α of θ(α) = parent + α·(stage − parent) tried on the dev splits")

    @field_validator("max_drop")
    @classmethod
    def _allowances(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: a for k, a in v.items() if a < 0}
        if bad:
            k = next(iter(bad))
            raise ValueError(f"{k}: an allowed drop is 0 or more (0: no drop below the base), got {bad[k]}")
        return v

    @field_validator("mitigate_alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0 < a < 1]
        if bad:
            raise ValueError(f"each α must be in (0, 1) (1 is the stage itself, 0 its parent); got {bad[0]}")
        return sorted(set(v), reverse=True)
