"""Transfer stage on tiny Llamas and hand-built vocabularies (tests/conftest.py): identities (λ = 0 is the target
bit for bit; the source base as target gives the fine-tuned source), vocabulary rows matched by token string
across reordered and added tokens, tokenizer_from both ways with consistent eos/pad ids, per-block λ, and the λ
search with an injected scorer. The refusals are in tests/reliability/test_merge_transfer_refusals.py. Slow
tests transfer world-sft's diff to world-v2 and run configs/pipelines/recycle_then_finetune.yaml."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import posttrain.stages  # noqa: F401  (registers the stage kinds and world-v2)
from posttrain.config import ConfigError, stage_pipeline
from posttrain.merging.compat import block_of
from posttrain.models import resolve_model
from posttrain.registry import WORLD_MODELS
from posttrain.stages.base import StageContext
from posttrain.merging.compat import align_rows
from posttrain.stages.transfer import TransferStageConfig, run
from tests.conftest import TINY_SOURCE_WORDS as SOURCE_WORDS
from tests.conftest import TINY_TARGET_WORDS as TARGET_WORDS
from tests.conftest import TINY_TEMPLATE as TEMPLATE
from tests.conftest import load_tensors, make_tiny_llama

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ----------------------------------------------------------------------------------------------- helpers


def make_ctx(tmp_path: Path, input_model: str | None = None, **extra) -> StageContext:
    work = tmp_path / "run" / "stages" / ".01_transfer.tmp"
    work.mkdir(parents=True, exist_ok=True)
    return StageContext(run_dir=tmp_path / "run", work_dir=work, index=1, seed=0, input_model=input_model,
                        resolve=lambda r: resolve_model(r, log=lambda m: None), log=lambda m: None, extra=extra)


def transfer(ctx: StageContext, m: dict, target: str = "tgt", **cfg):
    cfg = {"kind": "transfer", "source_base": str(m["sb"]), "source_finetuned": str(m["sf"]),
           "target_base": str(m[target]), **cfg}
    result = run(TransferStageConfig.model_validate(cfg), ctx)
    assert result.model_dir == ctx.work_dir / "model"
    return result


def expected(m: dict, target: str, scale_of=lambda name: 1.0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """target + λ·Δ computed here, rows matched by hand through the word lists."""
    tb, sb, sf = load_tensors(m[target]), load_tensors(m["sb"]), load_tensors(m["sf"])
    words = TARGET_WORDS if target == "tgt" else SOURCE_WORDS
    out = {}
    for name, t in tb.items():
        delta = sf[name].to(dtype) - sb[name].to(dtype)
        if name in (EMBED, HEAD):
            delta = torch.stack([delta[SOURCE_WORDS.index(w)] if w in SOURCE_WORDS else torch.zeros_like(delta[0])
                                 for w in words])
        out[name] = (t.to(dtype) + scale_of(name) * delta).to(t.dtype)
    return out


# ----------------------------------------------------------------------------------------------- identities


@pytest.mark.parametrize("target", ["tgt", "same"])
def test_zero_scale_gives_the_target_bit_exact(transfer_models, tmp_path, target):
    out = transfer(make_ctx(tmp_path), transfer_models, target, scale=0.0).model_dir
    got, want = load_tensors(out), load_tensors(transfer_models[target])
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name].view(torch.int32), want[name].view(torch.int32)), name


def test_source_base_as_target_gives_the_finetuned_source(transfer_models, tmp_path):
    got64 = load_tensors(transfer(make_ctx(tmp_path / "a"), transfer_models, "sb", dtype="float64").model_dir)
    got32 = load_tensors(transfer(make_ctx(tmp_path / "b"), transfer_models, "sb").model_dir)
    want = load_tensors(transfer_models["sf"])
    assert sorted(got64) == sorted(want)
    for name in want:
        # sb + (sf − sb) in float64 is exact for float32 inputs; in float32 it is off by a rounding at most.
        assert torch.equal(got64[name], want[name]), name
        torch.testing.assert_close(got32[name], want[name], rtol=0, atol=1e-6)


def test_a_target_in_another_dtype_gets_the_sum_in_its_dtype(transfer_models, tmp_path):
    """Only the two sources must share a dtype (tests/reliability): a bfloat16 target gets target + Δ in bfloat16."""
    t16 = make_tiny_llama(tmp_path / "same16", SOURCE_WORDS, base=transfer_models["same"], scale=0.0,
                          dtype=torch.bfloat16)
    models = {**transfer_models, "same16": t16}
    got = load_tensors(transfer(make_ctx(tmp_path), models, "same16", dtype="float64").model_dir)
    want = expected(models, "same16")
    for name in want:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name]), name
    assert not torch.equal(got[HEAD], load_tensors(t16)[HEAD])


# ----------------------------------------------------------------------------------------------- vocabulary


def test_align_rows_by_token_string():
    src = {w: i for i, w in enumerate(SOURCE_WORDS)}
    tgt = {w: i for i, w in enumerate(TARGET_WORDS)}
    rows, counts = align_rows(src, tgt, len(SOURCE_WORDS), len(TARGET_WORDS) + 2)  # 2 padding rows
    assert rows.tolist() == [0, 1, 2, 3, 7, 5, -1, 4, 6, 15, 14, -1, 8, 9, 10, 11, 12, -1, -1]
    assert counts == {"matched_tokens": 15, "unmatched_tokens": 2, "source_only_tokens": 1, "rows_without_token": 2}


def test_reordered_and_added_tokens_get_the_right_rows(transfer_models, tmp_path):
    result = transfer(make_ctx(tmp_path), transfer_models, dtype="float64", max_shard_bytes=6_000)
    got, want = load_tensors(result.model_dir), expected(transfer_models, "tgt")
    tb = load_tensors(transfer_models["tgt"])
    assert len(list(result.model_dir.glob("*.safetensors"))) > 1  # streamed into several shards
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for word in ("new_a", "new_b"):  # absent from the source: zero diff, the target's row bit for bit
        i = TARGET_WORDS.index(word)
        assert torch.equal(got[EMBED][i], tb[EMBED][i]) and torch.equal(got[HEAD][i], tb[HEAD][i])
    i = TARGET_WORDS.index("w3")
    assert not torch.equal(got[EMBED][i], tb[EMBED][i])
    assert result.metrics["matched_tokens"] == 15 and result.metrics["unmatched_tokens"] == 2
    assert result.metrics["source_only_tokens"] == 1 and result.metrics["vocab_tensors"] == 2
    summary = json.loads((result.model_dir.parent / "transfer.json").read_text())
    assert summary["unmatched_tokens"] == 2 and summary["scale"] == 1.0


@pytest.mark.parametrize("tokenizer_from", ["target", "source_finetuned"])
def test_tokenizer_from_writes_consistent_eos_and_pad(transfer_models, tmp_path, tokenizer_from):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = transfer(make_ctx(tmp_path), transfer_models, tokenizer_from=tokenizer_from).model_dir
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == {w: i for i, w in enumerate(TARGET_WORDS)}  # rows stay the target's
    eos = "<eos>" if tokenizer_from == "target" else "<eot>"
    assert tok.eos_token == eos and tok.pad_token == "<pad>"
    assert tok.chat_template == (None if tokenizer_from == "target" else TEMPLATE)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    # The tokenizer's eos comes first; the fine-tune's configs still name <eos> (inherited from its base), which
    # is kept after it, translated to the target's id.
    want_eos = 2 if tokenizer_from == "target" else [3, 2]
    assert tok.eos_token_id == TARGET_WORDS.index(eos)
    for c in (cfg, gen):
        assert c["eos_token_id"] == want_eos
        assert c["pad_token_id"] == TARGET_WORDS.index("<pad>") == tok.pad_token_id
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(TARGET_WORDS)
    if tokenizer_from == "target":
        assert (out / "tokenizer.json").read_bytes() == (transfer_models["tgt"] / "tokenizer.json").read_bytes()


# ----------------------------------------------------------------------------------------------- per block


def test_per_block_scales(transfer_models, tmp_path):
    per_block = {"layers.0": 0.0, "embed": 2.0, "lm_head": -0.5}
    result = transfer(make_ctx(tmp_path), transfer_models, scale=0.5, per_block=per_block, dtype="float64")
    got, tb = load_tensors(result.model_dir), load_tensors(transfer_models["tgt"])
    want = expected(transfer_models, "tgt", scale_of=lambda n: per_block.get(block_of(n), 0.5))
    for name in want:
        assert torch.equal(got[name], want[name]), name
        if block_of(name) == "layers.0":
            assert torch.equal(got[name], tb[name]), name
    assert not torch.equal(got["model.layers.1.mlp.up_proj.weight"], tb["model.layers.1.mlp.up_proj.weight"])
    assert result.metrics["per_block"] == per_block


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'embed'"):
        stage_pipeline("transfer", None, ["per_block={embd: 1.0}"])
    with pytest.raises(ConfigError, match="exclude each other"):
        stage_pipeline("transfer", None, ["per_block={embed: 1.0}",
                                          "search={metric: world_arithmetic/exact_match}"])
    with pytest.raises(ConfigError, match="tokenizer_from"):
        stage_pipeline("transfer", None, ["tokenizer_from=source"])


def test_unknown_block_at_run_time_is_refused_before_writing(transfer_models, tmp_path):
    ctx = make_ctx(tmp_path)
    with pytest.raises(ConfigError, match="layers.7"):
        transfer(ctx, transfer_models, per_block={"layers.7": 1.0})
    assert not (ctx.work_dir / "model").exists()


def test_default_config_and_world_v2_registration():
    cfg = stage_pipeline("transfer", Path(__file__).parent.parent / "configs" / "stages" / "transfer.yaml", None)
    stage = cfg.stages[0]
    assert (stage.model, stage.source_base, stage.source_finetuned) == ("world-v2", "world", "world-sft")
    assert stage.target_base is None and "world-v2" in WORLD_MODELS


# ----------------------------------------------------------------------------------------------- search


def test_search_records_every_trial_and_keeps_the_best(transfer_models, tmp_path):
    want = expected(transfer_models, "tgt", scale_of=lambda n: 0.5, dtype=torch.float32)

    def scorer(model_dir: Path) -> float:  # closeness to the λ = 0.5 transfer: trial 1 of [0, 0.5, 1] wins
        got = load_tensors(model_dir)
        return -sum(float((got[n] - want[n]).abs().sum()) for n in want)

    ctx = make_ctx(tmp_path, transfer_scorer=scorer)
    search = {"method": "grid", "space": [0.0, 0.5, 1.0], "metric": "world_arithmetic/exact_match"}
    result = transfer(ctx, transfer_models, search=search)
    lines = [json.loads(x) for x in (ctx.work_dir / "search.jsonl").read_text().splitlines()]
    assert [x["weights"] for x in lines[:3]] == [[0.0], [0.5], [1.0]] and all("score" in x for x in lines)
    assert lines[-1]["best"] and lines[-1]["trial"] == 1 and lines[1]["score"] == 0.0
    got = load_tensors(result.model_dir)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    assert result.metrics["search_trials"] == 3 and result.metrics["scale"] == 0.5
    assert not (ctx.work_dir / "search").exists()


def test_per_block_random_search_draws_one_scale_per_block(transfer_models, tmp_path):
    ctx = make_ctx(tmp_path, transfer_scorer=lambda d: 0.0)
    search = {"method": "random", "space": {"low": 0.0, "high": 1.0}, "scope": "per_block", "trials": 2,
              "metric": "world_arithmetic/exact_match"}
    transfer(ctx, transfer_models, search=search)
    lines = [json.loads(x) for x in (ctx.work_dir / "search.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    blocks = {"embed", "layers.0", "layers.1", "lm_head", "norm"}
    assert all(set(x["per_block"]) == blocks and all(len(v) == 1 for v in x["per_block"].values())
               for x in lines)


# ----------------------------------------------------------------------------------------------- world


@pytest.mark.slow
def test_world_v2_plus_sft_diff_beats_world_v2_on_arithmetic(tmp_path):
    from evals.runner import evaluate_model
    from posttrain.config import EvalConfig
    from posttrain.world.v2 import METALS

    v2 = Path(resolve_model("world-v2"))
    ctx = make_ctx(tmp_path, input_model=str(v2))
    result = run(TransferStageConfig(), ctx)  # source world, fine-tuned world-sft, target the input
    assert result.metrics["unmatched_tokens"] == len(METALS) and result.metrics["source_only_tokens"] == 0
    settings = EvalConfig(limit=100)
    scores = {name: evaluate_model(str(path), settings=settings, tasks=["world_arithmetic"])["scores"]
              for name, path in (("v2", v2), ("v2+delta", result.model_dir))}
    before = scores["v2"]["world_arithmetic/exact_match"]["value"]
    after = scores["v2+delta"]["world_arithmetic/exact_match"]["value"]
    print(f"world_arithmetic/exact_match: world-v2 {before:.3f}, world-v2 + Δ {after:.3f}")
    assert after > before + 0.1, (before, after)


@pytest.mark.slow  # a transfer, two 60-step SFTs and five evals: about a minute on two shared cores
def test_recycle_then_finetune_pipeline_runs_to_a_report(world, tmp_path):
    """configs/pipelines/recycle_then_finetune.yaml: world-v2 + Δ, then the same short SFT from it and from bare
    world-v2, in one report whose base is world-v2 and which shows world-sft (the diff's source) for reference.
    The recycled start keeps its lead after the same steps (Lin et al. 2025's recycling-then-finetuning)."""
    import yaml

    from posttrain.config import load_pipeline
    from posttrain.pipeline import run_pipeline

    path = Path(__file__).parent.parent / "configs" / "pipelines" / "recycle_then_finetune.yaml"
    run_dir = run_pipeline(load_pipeline(path, ["eval.limit=40"]), tmp_path / "run", lambda m: None)
    report = json.loads((run_dir / "report" / "forgetting.json").read_text())
    rows = {r["name"]: r for r in report["stages"]}
    assert list(rows) == ["base", "input:world-sft", "transfer", "sft_recycled", "sft_from_v2"]
    assert rows["base"]["model"] == resolve_model("world-v2") and rows["input:world-sft"]["reference"]
    steps = [yaml.safe_load((run_dir / "stages" / folder / "config.yaml").read_text())["trainer"]["max_steps"]
             for folder in ("02_sft_recycled", "03_sft_from_v2")]
    assert steps[0] == steps[1] > 0

    def arithmetic(row: str) -> float:
        return rows[row]["scores"]["world_arithmetic/exact_match"]["value"]

    assert arithmetic("transfer") >= arithmetic("base") + 0.2
    assert arithmetic("sft_recycled") >= arithmetic("sft_from_v2") + 0.2


def test_the_inputs_a_transfer_declares_follow_target_base():
    """With `target_base:` the transfer builds on it (lineage) and never loads its `model:` input (not hashed);
    its sources are always read, so the pipeline hashes their files."""
    from posttrain.stages.transfer import TransferStageConfig

    on_input = TransferStageConfig(kind="transfer")
    assert (on_input.lineage_input(), on_input.reads_input()) == (None, True)
    assert on_input.other_inputs() == ["world", "world-sft"]
    on_v2 = TransferStageConfig(kind="transfer", model="world", target_base="${stages.v2.model}")
    assert (on_v2.lineage_input(), on_v2.reads_input()) == ("${stages.v2.model}", False)
    assert on_v2.other_inputs() == ["world", "world-sft", "${stages.v2.model}"]
