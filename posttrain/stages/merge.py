"""Merge stage: combine fine-tuned models tensor by tensor with a registered merge method, optionally
searching the coefficients on a dev split.

Inputs are HF model folders (world names, local folders, hub names, ``${stages.<name>.model}``) or LoRA adapter
folders (an ``adapter_config.json``), which are first merged into their own base with peft. Before anything is
written every input is checked against the base: architecture (config.json ``model_type``, ``architectures``),
tensor names, shapes, dtypes; vocabulary-size differences point to the transfer stage. A refusal raises
:class:`MergeRefused` (a ``ValueError``; the CLI exits 2) and leaves no ``model/``.

Tensors are streamed as in mergekit, one name at a time, and each tensor in slices of 1 MiB
(posttrain/merging/stream.py): a slice is read from every input's safetensors shards into a reused buffer,
merged in float32 (float64 on request), cast back to the input dtype and written by a ``ShardedWriter``,
which knows every output tensor's shape and dtype in advance and puts each slice straight into its shard
file. The merge holds ~15 slice buffers (plus, for TIES, ~3% of one tensor per model while it finds the
trim thresholds), whatever the model's size; breadcrumbs holds (models + 3) whole tensors
(tests/test_merge_stage.py measures it). DELLA's slices are whole rows (its magnitude ranks are per row);
model_stock sums its angle over a tensor's slices before merging them.

Work folder (``ctx.work_dir``)::

    inputs/<i>/           LoRA adapters merged into their base (removed when the stage ends)
    search/trial_NNN/     candidate merges of a coefficient search (only the best survives; it becomes model/)
    search.jsonl          one line per trial, then the best (see posttrain.merging.search)
    .model.partial/       the merge being written, renamed to model/ once complete
    model/                the merge: weights + the base's config.json, generation_config.json, tokenizer files
    merge.json            method, params, coefficients and the resolved inputs
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import Field, field_validator, model_validator

from posttrain.merging.compat import block_of, check_compatible
from posttrain.merging.search import Coefficients, SearchConfig, check_grid
from posttrain.merging.stream import MergePlan, write_merge
from posttrain.models import ModelError
from posttrain.registry import MERGE_METHODS, RegistryError, did_you_mean
from posttrain.schema import ConfigError, Strict
from posttrain.stages.base import StageBase, StageContext, StageResult, stage
from posttrain.stages.combine import check_block_name, check_blocks, input_model_folder, search_coefficients
from posttrain.tensors import MergeMismatch, ShardedReader
from posttrain.world.notes import log_note


class MergeRefused(MergeMismatch, ModelError):
    """The inputs cannot be merged (architecture, names, shapes, dtypes, vocabulary); one line."""


_RESERVED = ("generator", "dtype", "scratch", "thresholds", "row_length", "stats")  # set by the stage itself


class MergeInput(Strict):
    model: str = Field(min_length=1, description="world | <folder> | <LoRA adapter folder> | <hub name> | "
                                                 "${stages.<name>.model}")
    weight: float = 1.0


def _world_specialists() -> list[MergeInput]:
    return [MergeInput(model="world-sft-arithmetic"), MergeInput(model="world-sft-reversal")]


class MergeStageConfig(StageBase):
    method: str = Field("ties", description="a merge method: " + ", ".join(MERGE_METHODS.names()))
    base: str | None = Field(None, description="pre-trained model; default: the stage input (`model:` or the "
                                               "previous stage); linear: the first model")
    models: list[MergeInput] = Field(default_factory=_world_specialists, min_length=1)
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters (density, lam, ...)")
    per_block: dict[str, list[float]] | None = Field(
        None, description="{layers.<i> | embed | lm_head | norm | other: one coefficient per model} (aTLAS)")
    dtype: Literal["float32", "float64"] = Field("float32", description="merge math; output keeps the input dtype")
    search: SearchConfig | None = None
    max_shard_bytes: int = Field(5_000_000_000, gt=0)
    seed: int | None = Field(None, description="DARE drop masks; None: the pipeline's seed")

    def lineage_input(self) -> str | None:
        """The merge builds on its `base:` when set; else a task-vector method on the stage input and a linear
        average on its first model (the defaults of `base:`)."""
        return self.builds_on() or (self.models[0].model if self.method == "linear" else self.model)

    def builds_on(self) -> str | None:
        return self.base or None

    def reads_input(self) -> bool:
        return super().reads_input() and self.method != "linear"

    def other_inputs(self) -> list[str]:
        return [m.model for m in self.models] + ([self.base] if self.base else [])

    def reference_models(self) -> list[str]:
        """Inputs the forgetting report shows as reference rows when they are not stages of the run."""
        return [m.model for m in self.models]

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        try:
            MERGE_METHODS.get(v)
        except RegistryError as e:  # a KeyError; pydantic only turns ValueErrors into validation errors
            raise ValueError(str(e)) from None
        return v

    @field_validator("per_block")
    @classmethod
    def _known_blocks(cls, v: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        for key in v or {}:
            check_block_name(key)
        return v

    @model_validator(mode="after")
    def _params_fit_method(self) -> MergeStageConfig:
        fn = MERGE_METHODS.get(self.method)
        known = _method_params(fn)
        for key in self.params:
            if key in _RESERVED:
                raise ValueError(f"params.{key}: set by the stage (use `dtype:` / `seed:` on the stage)")
            if key not in known:
                hint = did_you_mean(key, known) or f"; known: {', '.join(known) or 'none'}"
                raise ValueError(f"params.{key}: not a parameter of {self.method}{hint}")
        rows = [[m.weight for m in self.models]] + list((self.per_block or {}).values())
        for row in rows:
            if len(row) != len(self.models):
                raise ValueError(f"per_block: {len(row)} coefficients given but there are {len(self.models)} models")
            _dry_run(fn, self.method, row, self.params)
        if self.search is not None:
            if self.per_block:
                raise ValueError("per_block and search exclude each other; search per block with "
                                 "search.scope: per_block")
            if self.search.scope != "per_block":
                try:
                    check_grid(self.search, len(self.models))
                except ConfigError as e:
                    raise ValueError(str(e)) from None
        return self


def _method_params(fn: Callable) -> list[str]:
    return [n for n, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _RESERVED]


def _dry_run(fn: Callable, method: str, weights: list[float], params: dict[str, Any]) -> None:
    """Run the method on 4-element tensors so bad values (density 2, weights summing to 0) fail at config time."""
    base = torch.zeros(4)
    try:
        fn(base, [torch.ones(4)] * len(weights), list(weights), generator=torch.Generator().manual_seed(0),
           **params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{method}: {e}") from None


# ------------------------------------------------------------------------------------------------ inputs


def _check_architectures(folders: list[Path]) -> None:
    ref = json.loads((folders[0] / "config.json").read_text())
    for folder in folders[1:]:
        cfg = json.loads((folder / "config.json").read_text())
        for key in ("model_type", "architectures"):
            if cfg.get(key) != ref.get(key):
                raise MergeRefused(f"config.json {key} is {cfg.get(key)!r} in {folder} but {ref.get(key)!r} in "
                                   f"{folders[0]}: models of different architectures cannot be merged")


# ------------------------------------------------------------------------------------------------- merge


def _plan(cfg: MergeStageConfig, ctx: StageContext, base_dir: Path, model_dirs: list[Path]) -> MergePlan:
    """Open every input and refuse what cannot be merged, before anything is written."""
    folders = [base_dir, *model_dirs]
    _check_architectures(folders)
    readers = [ShardedReader(f, allow_pickle=cfg.allow_pickle) for f in folders]
    try:
        check_compatible(readers)
    except MergeMismatch as e:
        for r in readers:
            r.close()
        raise MergeRefused(str(e)) from None
    return MergePlan(
        method=cfg.method, fn=MERGE_METHODS.get(cfg.method), params=dict(cfg.params),
        dtype=torch.float64 if cfg.dtype == "float64" else torch.float32,
        seed=cfg.seed if cfg.seed is not None else ctx.seed, max_shard_bytes=cfg.max_shard_bytes,
        ref=readers[0], base=None if cfg.method == "linear" else readers[0], models=readers[1:],
        files_from=base_dir,
    )


# ------------------------------------------------------------------------------------------------- stage


@stage("merge", MergeStageConfig)
def run(cfg: MergeStageConfig, ctx: StageContext) -> StageResult:
    """Merge models tensor by tensor (task arithmetic, TIES, DARE, ...), optionally searching coefficients.

    Everything is resolved and checked before anything is written; see the module docstring for the folders.
    """
    out = ctx.work_dir / "model"
    shutil.rmtree(out, ignore_errors=True)  # left by an interrupted attempt of the same config
    scratch = ctx.work_dir / "inputs"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    plan = None
    try:
        model_dirs = [input_model_folder(m.model, ctx, cfg, scratch) for m in cfg.models]
        base_ref = cfg.base or (None if cfg.method == "linear" else ctx.input_model or "world")
        base_dir = input_model_folder(base_ref, ctx, cfg, scratch) if base_ref else model_dirs[0]
        plan = _plan(cfg, ctx, base_dir, model_dirs)
        blocks = sorted({block_of(n) for n in plan.ref.names()})
        check_blocks(cfg.per_block, blocks)
        ctx.log(f"merge: {cfg.method} of {len(model_dirs)} models onto {base_dir} ({len(plan.ref)} tensors)")
        log_note("merge", [base_ref, *(m.model for m in cfg.models)], ctx.log)  # the world's limits, said
        metrics: dict[str, Any] = {"method": cfg.method, "models": len(model_dirs), "tensors": len(plan.ref)}
        if cfg.search is None:
            coeffs = Coefficients([m.weight for m in cfg.models], cfg.per_block)
            write_merge(plan, coeffs, out)
        else:
            coeffs = search_coefficients(cfg.search, len(plan.models), blocks, lambda c, d: write_merge(plan, c, d),
                                         ctx, out, metrics, "merge_scorer", lambda point: _check_point(plan, point))
    finally:
        if plan is not None:
            plan.close()
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {**metrics, "params": cfg.params, "dtype": cfg.dtype, **coeffs.to_json(),
               "base": {"ref": base_ref, "folder": str(base_dir)},
               "inputs": [{"ref": m.model, "folder": str(d)} for m, d in zip(cfg.models, model_dirs)]}
    (ctx.work_dir / "merge.json").write_text(json.dumps(summary, indent=2) + "\n")
    ctx.log_metrics({"event": "merge", **metrics, **coeffs.to_json()})
    return StageResult(out, metrics)


def _check_point(plan: MergePlan, point: Coefficients) -> None:
    """A searched point the method refuses (linear with a shared 0) fails before the first trial is written."""
    for row in [point.weights, *(point.per_block or {}).values()]:
        try:
            _dry_run(plan.fn, "search", row, plan.params)
        except ValueError as e:
            raise ConfigError(f"{e} (coefficients {point.to_json()})") from None
