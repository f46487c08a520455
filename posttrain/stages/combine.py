"""What the merge and transfer stages share: their inputs (world names, folders, hub names, earlier stages,
LoRA adapters merged into their base), the base's files copied next to the written weights, the per-block
coefficient names, and the coefficient search (posttrain.merging.search) scored on the eval suite's dev split.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from evals import runner  # through the module: tests replace evaluate_model
from evals.config import EvalConfig
from posttrain.config_refs import STAGE_REF
from posttrain.merging.search import Coefficients, Scorer, SearchConfig, candidates, run_search
from posttrain.merging.stream import copy_base_files
from posttrain.models import ModelError, check_weights
from posttrain.registry import did_you_mean
from posttrain.schema import ConfigError
from posttrain.stages.base import StageBase, StageContext
from posttrain.tensors import ShardedReader

BLOCK_RE = re.compile(r"^(?:layers\.\d+|embed|lm_head|norm|other)$")  # the names block_of() returns


def check_block_name(key: str) -> None:
    """A `per_block:` key must name a block (config time; `check_blocks` checks it against the model)."""
    if not BLOCK_RE.match(key):
        raise ValueError(f"unknown block {key!r}{did_you_mean(key, ['embed', 'lm_head', 'norm', 'other'])}; "
                         "blocks are layers.<i>, embed, lm_head, norm, other")


def check_blocks(per_block: dict[str, Any] | None, blocks: list[str]) -> None:
    for key in per_block or {}:
        if key not in blocks:
            raise ConfigError(f"per_block.{key}: no tensor of the model is in this block{did_you_mean(key, blocks)}; "
                              f"blocks: {', '.join(blocks)}")


# ------------------------------------------------------------------------------------------------ inputs


def resolve_ref(ref: str, ctx: StageContext) -> str:
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


def local_folder(ref: str) -> Path:
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


def input_model_folder(ref: str, ctx: StageContext, cfg: StageBase, scratch: Path) -> Path:
    """Resolve one input to a folder of safetensors weights; a LoRA adapter is merged into its base first."""
    folder = local_folder(resolve_ref(ref, ctx))
    if (folder / "adapter_config.json").is_file():
        folder = merge_adapter(folder, ctx, cfg, scratch)
    check_weights(str(folder), cfg.allow_pickle)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json (is it a Hugging Face model folder?)")
    return folder


def merge_adapter(adapter: Path, ctx: StageContext, cfg: StageBase, scratch: Path) -> Path:
    """peft's merge_and_unload of a LoRA adapter into its base, in float32, saved in the base's dtype."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_ref = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    if not base_ref:
        raise ModelError(f"{adapter}/adapter_config.json names no base_model_name_or_path")
    base = local_folder(resolve_ref(base_ref, ctx))
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
    copy_base_files(base, out, overwrite=False)  # the tokenizer of the base, unless the adapter has its own
    copy_base_files(adapter, out, overwrite=True, only_tokenizer=True)
    return out


# ------------------------------------------------------------------------------------------------ search


def eval_scorer(search: SearchConfig, log: Callable[[str], None] = print) -> Scorer:
    """The default scorer: `search.metric` from the eval suite on `search.split`, scoring only its task."""
    suite = runner.load_suite(search.suite)
    if search.task not in suite.tasks:
        raise ConfigError(f"search.metric: task {search.task!r} is not in suite {suite.name!r} "
                          f"({', '.join(suite.tasks)})")
    settings = EvalConfig(suite=search.suite, limit=search.limit)

    def score(model_dir: Path) -> float:
        result = runner.evaluate_model(str(model_dir), settings=settings, split=search.split, tasks=[search.task], log=log)
        scores = result["scores"]
        if search.metric not in scores:
            raise ConfigError(f"search.metric: {search.metric!r} is not a score of the eval; it gave "
                              f"{', '.join(sorted(scores)) or 'nothing'}")
        return float(scores[search.metric]["value"])

    return score


def search_coefficients(search: SearchConfig, n_models: int, blocks: list[str], write: Callable[[Coefficients, Path], None],
                        ctx: StageContext, out: Path, metrics: dict[str, Any], scorer_key: str,
                        check: Callable[[Coefficients], None] | None = None) -> Coefficients:
    """Run the coefficient search (`n_models` coefficients per point; transfer's λ is one "model") and move the
    best candidate to `out`. `check` refuses a point before the first trial is written; the scorer is
    injectable through ctx.extra[scorer_key] (a callable: model folder -> score)."""
    points = candidates(search, n_models, blocks, ctx.seed)
    for point in points:
        if check is not None:
            check(point)
    scorer = ctx.extra.get(scorer_key) or eval_scorer(search, ctx.log)
    coeffs, found = run_search(search, points, write, scorer, ctx.work_dir, out, ctx.log)
    metrics.update(found)
    return coeffs
