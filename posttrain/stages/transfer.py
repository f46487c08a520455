"""Transfer stage: carry a fine-tuning from one base version to another by adding its diff vector.

Fine-tuning transfer (Lin et al. 2025, "Efficient Model Development through Fine-tuning Transfer"): the diff
vector Δ = source_finetuned − source_base is added to a different base, ``target_base + λ·Δ``, so a new base
version gains the old fine-tuning without training; a pipeline that fine-tunes the result next is their
"recycling-then-finetuning". Departures from the paper:

- vocabularies may differ: embedding and LM-head rows are matched by token string between the source and
  target tokenizers (the paper uses model pairs that share a vocabulary); a target token absent from the source
  gets a zero diff (its row stays the target's); rows of source tokens absent from the target are dropped;
- λ may differ per block (``per_block``, blocks of :func:`posttrain.merging.compat.block_of`) and may be searched
  on a dev split (``search``, :mod:`posttrain.merging.search`); the paper uses λ = 1.

Everything is checked before anything is written: architecture (config.json ``model_type``, ``architectures``),
tensor names in all three models, shapes (source base = source fine-tuned exactly; target = source except the
row count of vocabulary tensors), dtypes (the two sources alike; the target's may differ), identical source
vocabularies, and that the special tokens of the chosen
tokenizer exist in the target's vocabulary. A refusal raises :class:`TransferRefused` (a ``ValueError`` and a
``ModelError``: the CLI exits 2) naming the tensor or token, and leaves no ``model/``.

Tensors stream one name at a time from the three models' safetensors (``ShardedReader``) into a
``ShardedWriter``; the diff is computed in float32 (float64 on request) and the sum cast to the target's dtype.

Work folder (``ctx.work_dir``)::

    inputs/<i>/           LoRA adapters merged into their base (removed when the stage ends)
    search/trial_NNN/     candidates of a λ search (only the best survives; it becomes model/)
    search.jsonl          one line per trial, then the best (see posttrain.merging.search)
    .model.partial/       the transfer being written, renamed to model/ once complete
    model/                target + λ·Δ: the target's config.json and generation_config.json (special token ids
                          rewritten to match the tokenizer written), the tokenizer of ``tokenizer_from``
    transfer.json         λ, per-block λ, vocabulary alignment counts and the resolved inputs
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from posttrain.merging.compat import block_of, coefficients_for
from posttrain.merging.ops import transfer_tensor
from posttrain.merging.search import Coefficients, SearchConfig, check_grid
from posttrain.merging.stream import copy_base_files, with_progress
from posttrain.schema import ConfigError
from posttrain.stages.base import StageBase, StageContext, StageResult, stage
from posttrain.stages.combine import check_block_name, check_blocks, input_model_folder, search_coefficients
from posttrain.stages.transfer_plan import TransferPlan, plan_transfer
from posttrain.tensor_writer import ShardedWriter



class TransferStageConfig(StageBase):
    source_base: str = Field("world", description="the base the fine-tuning started from")
    source_finetuned: str = Field("world-sft", description="the fine-tuned model whose diff is carried")
    target_base: str | None = Field(None, description="the new base; default: the stage input (`model:`)")
    scale: float = Field(1.0, description="λ in target + λ·(source_finetuned − source_base)")
    per_block: dict[str, float] | None = Field(
        None, description="{layers.<i> | embed | lm_head | norm | other: λ}; blocks not named take `scale`")
    tokenizer_from: Literal["target", "source_finetuned"] = Field(
        "target", description="chat template and special tokens; the vocabulary is always the target's")
    dtype: Literal["float32", "float64"] = Field("float32", description="diff math; output keeps the target dtype")
    search: SearchConfig | None = Field(None, description="search λ on a dev split (scope shared or per_block)")
    max_shard_bytes: int = Field(5_000_000_000, gt=0)

    def builds_on(self) -> str | None:
        return self.target_base or None

    def other_inputs(self) -> list[str]:
        return [self.source_base, self.source_finetuned] + ([self.target_base] if self.target_base else [])

    def reference_models(self) -> list[str]:
        """Inputs the forgetting report shows as reference rows when they are not stages of the run."""
        return [self.source_finetuned]

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"scale must be finite, got {v}")
        return v

    @field_validator("per_block")
    @classmethod
    def _known_blocks(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (v or {}).items():
            check_block_name(key)
            if not math.isfinite(value):
                raise ValueError(f"per_block.{key} must be finite, got {value}")
        return v

    @model_validator(mode="after")
    def _search_fits(self) -> TransferStageConfig:
        if self.search is None:
            return self
        if self.per_block:
            raise ValueError("per_block and search exclude each other; search per block with search.scope: per_block")
        if self.search.scope != "per_block":
            try:
                check_grid(self.search, 1)  # one λ: per_model and shared are the same search
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return self


# --------------------------------------------------------------------------------------------------- write


def write_transfer(plan: TransferPlan, coeffs: Coefficients, out: Path) -> None:
    """Stream target + λ·Δ tensor by tensor into `out` (a partial folder renamed when complete)."""
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        # The layout lets the writer put each tensor straight into its shard file: no shard is held in memory
        # (the output has the target's names, shapes and dtypes: transfer_tensor returns the target's dtype).
        with ShardedWriter(partial, max_shard_bytes=plan.max_shard_bytes,
                           layout=plan.target.layout()) as writer:
            for name in with_progress(plan.target.names(), plan.target, "transfer"):
                scale = coefficients_for(name, coeffs.weights, coeffs.per_block)[0]
                t = plan.target.get(name)
                if scale != 0.0 and t.is_floating_point():
                    t = transfer_tensor(t, plan.source_base.get(name), plan.source_finetuned.get(name), scale,
                                        rows=plan.rows.get(name), dtype=plan.dtype)
                writer.add(name, t)
        _write_files(plan, partial)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _write_files(plan: TransferPlan, folder: Path) -> None:
    """The target's configs with special-token ids matching the tokenizer written next to them."""
    if plan.tokenizer is None:
        copy_base_files(plan.target_dir, folder)
    else:
        for name in ("config.json", "generation_config.json"):
            if (plan.target_dir / name).is_file():
                shutil.copy2(plan.target_dir / name, folder / name)
        plan.tokenizer.save_pretrained(folder)
    for name, ids in (("config.json", plan.config_ids), ("generation_config.json", plan.generation_ids)):
        path = folder / name
        if ids and path.is_file():
            cfg = json.loads(path.read_text())
            if any(cfg.get(k) != v for k, v in ids.items()):
                cfg.update(ids)
                path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------- stage


@stage("transfer", TransferStageConfig)
def run(cfg: TransferStageConfig, ctx: StageContext) -> StageResult:
    """Fine-tuning transfer: target_base + λ·(source_finetuned − source_base), vocabularies aligned by token."""
    out = ctx.work_dir / "model"
    shutil.rmtree(out, ignore_errors=True)  # left by an interrupted attempt of the same config
    scratch = ctx.work_dir / "inputs"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    plan = None
    target_ref = cfg.target_base or ctx.input_model or "world"
    refs = {"target_base": target_ref, "source_base": cfg.source_base, "source_finetuned": cfg.source_finetuned}
    try:
        folders = {k: input_model_folder(ref, ctx, cfg, scratch) for k, ref in refs.items()}  # type: ignore[arg-type]
        plan = plan_transfer(cfg, ctx, folders["target_base"], folders["source_base"], folders["source_finetuned"])
        blocks = sorted({block_of(n) for n in plan.target.names()})
        per_block = {k: [v] for k, v in (cfg.per_block or {}).items()} or None
        check_blocks(per_block, blocks)
        ctx.log(f"transfer: {folders['target_base']} + λ·({folders['source_finetuned']} − "
                f"{folders['source_base']}), vocabulary {plan.vocab or 'not aligned (no vocabulary tensor)'}")
        metrics: dict[str, Any] = {"tensors": len(plan.target), "vocab_tensors": len(plan.rows), **plan.vocab,
                                   "tokenizer_from": cfg.tokenizer_from}
        if cfg.search is None:
            coeffs = Coefficients([cfg.scale], per_block)
            write_transfer(plan, coeffs, out)
        else:
            coeffs = search_coefficients(cfg.search, 1, blocks, lambda c, d: write_transfer(plan, c, d), ctx, out,
                                         metrics, "transfer_scorer")  # one "model": the diff
    finally:
        if plan is not None:
            plan.close()
        shutil.rmtree(scratch, ignore_errors=True)
    lam = {"scale": coeffs.weights[0], "per_block": {k: v[0] for k, v in (coeffs.per_block or {}).items()} or None}
    summary = {**metrics, **lam, "dtype": cfg.dtype,
               "inputs": {k: {"ref": refs[k], "folder": str(folders[k])} for k in refs}}
    (ctx.work_dir / "transfer.json").write_text(json.dumps(summary, indent=2) + "\n")
    metrics.update(lam)
    ctx.log_metrics({"event": "transfer", **metrics})
    return StageResult(out, metrics)
