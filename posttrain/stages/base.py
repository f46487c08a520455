"""What every stage shares: the spec in the registry, the base config, the context and the result.

A stage is a config class plus one function `run(cfg, ctx) -> StageResult`, registered under its kind with
`@stage("sft", SFTStageConfig)`, the one place the kind is written (it becomes the config's `kind` field). It
reads its inputs through `ctx`, writes one HF model folder at `ctx.work_dir / "model"`, and appends its
training log to `ctx.work_dir / "metrics.jsonl"`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field
from pydantic.fields import FieldInfo

from posttrain.schema import NAME_PATTERN, Strict
from posttrain.registry import STAGES


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config: type
    run: Callable[[Any, "StageContext"], "StageResult"]
    doc: str = ""


def stage(kind: str, config: type) -> Callable:
    """Register `fn` as the runner of stage kind `kind` with config class `config`, whose `kind` field becomes
    `Literal[kind]` defaulting to `kind`."""

    def deco(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()
        STAGES.register(kind, StageSpec(kind, config, fn, doc[0] if doc else ""))
        _set_kind(config, kind)
        return fn

    return deco


def _set_kind(config: type, kind: str) -> None:
    """Make `config.kind` the field `Literal[kind] = kind` (any other kind fails validation on that field).

    pydantic builds a model's validator when the class is created, before the decorator below it runs; a field
    replaced afterwards takes effect with `model_rebuild(force=True)`. tests/test_registry.py checks that it
    did for every kind.
    """
    config.model_fields["kind"] = FieldInfo.from_annotated_attribute(Literal[kind], kind)
    config.model_rebuild(force=True)


class StageBase(Strict):
    """Fields every stage has. `model` defaults to the previous stage's output (the world base for the first)."""

    name: str | None = Field(None, pattern=NAME_PATTERN)
    kind: str = Field(description="set by @stage from the registered kind")
    model: str | None = Field(None, description="world | <local folder> | <hub name> | ${stages.<name>.model}")
    trains_on: list[str] = Field(default_factory=list, description="eval tasks this stage trains for (for BWT)")
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def lineage_input(self) -> str | None:
        """The model ref this stage builds on, for the report's lineage (its first parent): `builds_on()` when
        set, else `model` (None: the previous stage)."""
        return self.builds_on() or self.model

    def builds_on(self) -> str | None:
        """The model the stage adds to when that is not its `model:` input (a merge's `base:`, a transfer's
        `target_base:`), else None. A pipeline whose first stage sets one reports it as its base row."""
        return None

    def generates(self) -> bool:
        """False when the stage's model/ is no language model (the reward stage's sequence classifier): the
        pipeline runs no generation evals on it, and no later stage may take it as its `model:` input."""
        return True

    def reads_input(self) -> bool:
        """False when the stage never loads its `model:` input (it builds on another field: `builds_on()`), so
        that a change of the input does not rerun it."""
        return self.builds_on() is None

    def other_inputs(self) -> list[str]:
        """Model refs the stage reads besides `model:` (a merge's models and base, a transfer's sources): the
        pipeline hashes what they hold into the stage's inputs, so a model retrained in place reruns it."""
        return []

    def scorers(self) -> list[str]:
        """The refs among `other_inputs()` that score text (a GRPO reward's `reward_model`), not models whose
        weights the stage reads: those may be reward stages' sequence classifiers, the others may not."""
        return []

    def training_data(self) -> list[Any]:
        """The data sources the stage trains on (its `data:`): the pipeline checks that their local files exist
        and hashes them into the stage's inputs, and the report counts the world tasks among them as trained on."""
        return []

    def reference_models(self) -> list[str]:
        """Input models the forgetting report shows as reference rows when they are not stages of the run."""
        return []

    def data_sources(self) -> list[tuple[Any, str]]:
        """(data source, row shape: a key of `posttrain.data.CHECKS`) of every dataset the stage reads, so the
        pipeline can read and check them all before a run starts."""
        return []

    def input_files(self) -> list[str]:
        """Local files the stage's behaviour depends on besides its data (a GRPO user reward's .py file): the
        pipeline hashes them into the stage's inputs, so an edited file reruns it."""
        return []


@dataclass
class StageContext:
    run_dir: Path
    work_dir: Path
    index: int
    seed: int
    input_model: str | None
    resolve: Callable[[str], str]
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)
    report_to: list[str] = field(default_factory=list)  # trackers (posttrain.tracking); [] reports to none
    run_name: str = ""  # the tracker run's name: <pipeline>/<stage>

    @property
    def metrics_path(self) -> Path:
        return self.work_dir / "metrics.jsonl"

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line; non-finite floats become null so the file stays valid JSON."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean, default=str) + "\n")
            f.flush()


@dataclass
class StageResult:
    model_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
