"""Merge stage: combine fine-tuned models tensor by tensor with a registered merge method, optionally
searching the coefficients on a dev split.

Inputs are HF model folders (world names, local folders, hub names, ``${stages.<name>.model}``) or LoRA adapter
folders (an ``adapter_config.json``), which are first merged into their own base with peft. Before anything is
written every input is checked against the base: architecture (config.json ``model_type``, ``architectures``),
tensor names, shapes, dtypes; vocabulary-size differences point to the transfer stage. A refusal raises
:class:`MergeRefused` (a ``ValueError``; the CLI exits 2) and leaves no ``model/``.

Tensors are streamed as in mergekit, one name at a time, and each tensor in slices of 1 MiB
(posttrain/merge_stream.py): a slice is read from every input's safetensors shards into a reused buffer,
merged in float32 (float64 on request), cast back to the input dtype and written by a ``ShardedWriter``,
which knows every output tensor's shape and dtype in advance and puts each slice straight into its shard
file. The merge holds ~15 slice buffers (plus, for TIES, ~3% of one tensor per model while it finds the
trim thresholds), whatever the model's size; breadcrumbs holds (models + 3) whole tensors
(tests/test_merge_stage.py measures it).

Work folder (``ctx.work_dir``)::

    inputs/<i>/           LoRA adapters merged into their base (removed when the stage ends)
    search/trial_NNN/     candidate merges of a coefficient search (only the best survives; it becomes model/)
    search.jsonl          one line per trial, then the best (see posttrain.merge_search)
    .model.partial/       the merge being written, renamed to model/ once complete
    model/                the merge: weights + the base's config.json, generation_config.json, tokenizer files
    merge.json            method, params, coefficients and the resolved inputs
"""
from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

import posttrain.merge_methods  # noqa: F401  (fills MERGE_METHODS)
from posttrain import merge_search, merge_stream
from posttrain.config import ConfigError, Strict
from posttrain.config_refs import STAGE_REF
from posttrain.compat import block_of, check_compatible, coefficients_for
from posttrain.merge_search import Coefficients, SearchConfig
from posttrain.merge_stream import Scratch
from posttrain.models import ModelError, check_weights
from posttrain.registry import MERGE_METHODS, RegistryError, did_you_mean
from posttrain.stages.base import StageBase, StageContext, StageResult, stage
from posttrain.tensors import INDEX_FILE, MergeMismatch, ShardedReader, ShardedWriter
from posttrain.world.notes import log_note


class MergeRefused(MergeMismatch, ModelError):
    """The inputs cannot be merged (architecture, names, shapes, dtypes, vocabulary); one line."""


_BLOCK_RE = re.compile(r"^(?:layers\.\d+|embed|lm_head|norm|other)$")  # the names block_of() returns
_RESERVED = ("generator", "dtype", "scratch", "thresholds")  # method arguments the stage sets itself
# Files copied from the base next to the merged weights: config, generation config, tokenizer and template.
_BASE_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
               "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*", "*.tiktoken", "spiece.model")


class MergeInput(Strict):
    model: str = Field(min_length=1, description="world | <folder> | <LoRA adapter folder> | <hub name> | "
                                                 "${stages.<name>.model}")
    weight: float = 1.0


def _world_specialists() -> list[MergeInput]:
    return [MergeInput(model="world-sft-arithmetic"), MergeInput(model="world-sft-reversal")]


class MergeStageConfig(StageBase):
    kind: str = Field("merge", pattern="^merge$")
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
            if not _BLOCK_RE.match(key):
                raise ValueError(f"unknown block {key!r}{did_you_mean(key, ['embed', 'lm_head', 'norm', 'other'])}; "
                                 "blocks are layers.<i>, embed, lm_head, norm, other")
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
                    merge_search.check_grid(self.search, len(self.models))
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


def _resolve(ref: str, ctx: StageContext) -> str:
    """A plain ref through ctx.resolve; `${stages.<name>.model}` to that earlier stage's folder in the run dir."""
    m = STAGE_REF.match(ref)
    if not m:
        path = Path(ref).expanduser()
        if (path / "adapter_config.json").is_file():
            return str(path.resolve())  # a LoRA adapter has no config.json, which ctx.resolve would refuse
        return ctx.resolve(ref)
    name = m.group(1)
    found: list[tuple[int, Path]] = []
    earlier: list[str] = []
    for p in (ctx.run_dir / "stages").glob("[0-9]*_*"):
        idx, _, stage_name = p.name.partition("_")
        if idx.isdigit() and int(idx) < ctx.index and (p / "model").is_dir():
            earlier.append(stage_name)
            if stage_name == name:
                found.append((int(idx), p / "model"))
    if not found:
        raise ModelError(f"{ref}: no finished earlier stage {name!r} in {ctx.run_dir / 'stages'}"
                         f"{did_you_mean(name, earlier)}")
    return str(max(found)[1])


def _local(ref: str) -> Path:
    """A local folder for a resolved ref; hub names come from the hub cache (weights, configs, tokenizer)."""
    path = Path(ref)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                           "*.jinja", "*.tiktoken"]))
    except Exception as e:  # noqa: BLE001 - offline, private, missing: one line for the user
        raise ModelError(f"model {ref!r}: not a folder and not fetchable from the hub ({type(e).__name__})") from None


def _input_folder(ref: str, ctx: StageContext, cfg: MergeStageConfig, scratch: Path) -> Path:
    """Resolve one input to a folder of safetensors weights; a LoRA adapter is merged into its base first."""
    folder = _local(_resolve(ref, ctx))
    if (folder / "adapter_config.json").is_file():
        folder = _merge_adapter(folder, ctx, cfg, scratch)
    check_weights(str(folder), cfg.allow_pickle)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json (is it a Hugging Face model folder?)")
    return folder


def _merge_adapter(adapter: Path, ctx: StageContext, cfg: MergeStageConfig, scratch: Path) -> Path:
    """peft's merge_and_unload of a LoRA adapter into its base, in float32, saved in the base's dtype."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_ref = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    if not base_ref:
        raise ModelError(f"{adapter}/adapter_config.json names no base_model_name_or_path")
    base = _local(_resolve(base_ref, ctx))
    check_weights(str(base), cfg.allow_pickle)
    with ShardedReader(base, allow_pickle=cfg.allow_pickle) as r:
        dtype = next((r.dtype(n) for n in r.names() if r.dtype(n).is_floating_point), torch.float32)
    ctx.log(f"merge: merging LoRA adapter {adapter} into {base}")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32,
                                                 trust_remote_code=cfg.trust_remote_code,
                                                 use_safetensors=None if cfg.allow_pickle else True)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = scratch / f"{len(list(scratch.glob('*'))):02d}_{adapter.name}"
    merged.to(dtype).save_pretrained(out, safe_serialization=True)
    _copy_base_files(base, out, overwrite=False)  # the tokenizer of the base, unless the adapter has its own
    _copy_base_files(adapter, out, overwrite=True, only_tokenizer=True)
    return out


def _copy_base_files(src: Path, dst: Path, overwrite: bool = True, only_tokenizer: bool = False) -> None:
    patterns = [p for p in _BASE_FILES if not (only_tokenizer and p.endswith("config.json"))]
    for p in sorted(src.iterdir()):
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns) and p.name != INDEX_FILE:
            if overwrite or not (dst / p.name).exists():
                shutil.copy2(p, dst / p.name)


def _check_architectures(folders: list[Path]) -> None:
    ref = json.loads((folders[0] / "config.json").read_text())
    for folder in folders[1:]:
        cfg = json.loads((folder / "config.json").read_text())
        for key in ("model_type", "architectures"):
            if cfg.get(key) != ref.get(key):
                raise MergeRefused(f"config.json {key} is {cfg.get(key)!r} in {folder} but {ref.get(key)!r} in "
                                   f"{folders[0]}: models of different architectures cannot be merged")


# ------------------------------------------------------------------------------------------------- merge


@dataclass
class _Plan:
    """Everything one merge needs except the coefficients (a search writes several merges from one plan)."""

    method: str
    fn: Callable
    params: dict[str, Any]
    dtype: torch.dtype  # math
    seed: int
    max_shard_bytes: int
    ref: ShardedReader  # names, output dtypes and non-float tensors come from here (the base)
    base: ShardedReader | None  # None for linear, which ignores the base
    models: list[ShardedReader]
    files_from: Path

    def close(self) -> None:
        for r in {id(r): r for r in [self.ref, *([self.base] if self.base else []), *self.models]}.values():
            r.close()


def _plan(cfg: MergeStageConfig, ctx: StageContext, base_dir: Path, model_dirs: list[Path]) -> _Plan:
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
    return _Plan(
        method=cfg.method, fn=MERGE_METHODS.get(cfg.method), params=dict(cfg.params),
        dtype=torch.float64 if cfg.dtype == "float64" else torch.float32,
        seed=cfg.seed if cfg.seed is not None else ctx.seed, max_shard_bytes=cfg.max_shard_bytes,
        ref=readers[0], base=None if cfg.method == "linear" else readers[0], models=readers[1:],
        files_from=base_dir,
    )


def model_generators(seed: int, n_models: int) -> list[np.random.Generator]:
    """One generator per model for the DARE masks: numpy PCG64 streams spawned from ``SeedSequence(seed)``
    (independent by construction), each running on tensor after tensor, slice after slice."""
    return [np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(n_models)]


def write_merge(plan: _Plan, coeffs: Coefficients, out: Path) -> None:
    """Stream every tensor through the method into `out` (written as a partial folder, renamed when complete).

    Each model's generator (:func:`model_generators`) draws its DARE masks tensor by tensor in sorted-name
    order, so the same seed gives the same merge whatever the sharding of the inputs and the slicing.
    """
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    gens = model_generators(plan.seed, len(plan.models))
    scratch = Scratch()  # the slice buffers, reused by every tensor
    try:
        # The layout lets the writer put each tensor straight into its shard file: no shard is held in memory.
        with ShardedWriter(partial, max_shard_bytes=plan.max_shard_bytes, layout=plan.ref.layout()) as writer:
            for name in merge_stream.with_progress(plan.ref.names(), plan.ref, "merge"):
                weights = coefficients_for(name, coeffs.weights, coeffs.per_block)
                merge_stream.write_tensor(plan, name, weights, gens, writer, scratch)
        _copy_base_files(plan.files_from, partial)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _check_blocks(per_block: dict[str, list[float]] | None, blocks: list[str]) -> None:
    for key in per_block or {}:
        if key not in blocks:
            raise ConfigError(f"per_block.{key}: no tensor of the model is in this block{did_you_mean(key, blocks)}; "
                              f"blocks: {', '.join(blocks)}")


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
        model_dirs = [_input_folder(m.model, ctx, cfg, scratch) for m in cfg.models]
        base_ref = cfg.base or (None if cfg.method == "linear" else ctx.input_model or "world")
        base_dir = _input_folder(base_ref, ctx, cfg, scratch) if base_ref else model_dirs[0]
        plan = _plan(cfg, ctx, base_dir, model_dirs)
        blocks = sorted({block_of(n) for n in plan.ref.names()})
        _check_blocks(cfg.per_block, blocks)
        ctx.log(f"merge: {cfg.method} of {len(model_dirs)} models onto {base_dir} ({len(plan.ref)} tensors)")
        log_note("merge", [base_ref, *(m.model for m in cfg.models)], ctx.log)  # the world's limits, said
        metrics: dict[str, Any] = {"method": cfg.method, "models": len(model_dirs), "tensors": len(plan.ref)}
        if cfg.search is None:
            coeffs = Coefficients([m.weight for m in cfg.models], cfg.per_block)
            write_merge(plan, coeffs, out)
        else:
            coeffs = _search(cfg.search, plan, ctx, blocks, out, metrics)
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


def _search(search: SearchConfig, plan: _Plan, ctx: StageContext, blocks: list[str], out: Path,
            metrics: dict[str, Any]) -> Coefficients:
    """Run the coefficient search and move the best candidate to `out`; the scorer is injectable through
    ctx.extra["merge_scorer"] (a callable: model folder -> score)."""
    points = merge_search.candidates(search, len(plan.models), blocks, ctx.seed)
    for point in points:  # e.g. linear with a shared 0: refuse before the first trial is written
        for row in [point.weights, *(point.per_block or {}).values()]:
            try:
                _dry_run(plan.fn, "search", row, plan.params)
            except ValueError as e:
                raise ConfigError(f"{e} (coefficients {point.to_json()})") from None
    scorer = ctx.extra.get("merge_scorer") or merge_search.eval_scorer(search, ctx.log)
    coeffs, found = merge_search.run_search(search, points, lambda c, d: write_merge(plan, c, d), scorer,
                                            ctx.work_dir, out, ctx.log)
    metrics.update(found)
    return coeffs
