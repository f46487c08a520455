"""Issue #9 item 9: merge and transfer inputs that do not fit (tensor names, shapes, dtypes, vocabularies,
architectures, special tokens) are refused before anything is written: one line that names the tensor (or the
config key or token), and no model folder, partial folder or scratch folder left behind; on the command line,
exit code 2. The tiny Llamas come from tests/conftest.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import posttrain.stages  # noqa: F401  (registers the stage kinds)
from posttrain.models import ModelError
from posttrain.stages.merge import MergeRefused
from posttrain.stages.transfer_plan import TransferRefused
from posttrain.tensors import MergeMismatch
from tests.conftest import (TINY_SOURCE_WORDS, TINY_TARGET_WORDS, TINY_TEMPLATE, make_tiny_llama, tiny_tokenizer,
                            with_architecture, with_renamed_tensor)
from tests.test_merge_stage import make_ctx as merge_ctx
from tests.test_merge_stage import merge, models_
from tests.test_transfer import make_ctx as transfer_ctx
from tests.test_transfer import transfer


def assert_refused_cleanly(error: Exception, expect: list[str], work_dir: Path) -> None:
    """One line holding every expected part, a ValueError and ModelError (the CLI's exit 2), nothing written."""
    msg = str(error)
    assert isinstance(error, ValueError) and isinstance(error, ModelError) and isinstance(error, MergeMismatch)
    assert "\n" not in msg
    for part in expect:
        assert part in msg, msg
    assert not (work_dir / "model").exists()
    assert not list(work_dir.glob(".model*")) and not (work_dir / "inputs").exists()
    assert not (work_dir / "search").exists()


def assert_cli_refused(r, expect: str, run_dir: Path) -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expect in last, last
    assert not list(run_dir.glob("stages/*/model")) and not list(run_dir.glob("stages/*/.model*"))


# ----------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("case, expect", [
    ("names", ["'model.layers.1.mlp.gate_proj.extra'", "is in", "but not in"]),
    ("shapes", ["'model.layers.0.mlp.down_proj.weight' has shape [16, 32]", "but [16, 48]"]),
    ("vocab", ["'lm_head.weight'", "vocabulary sizes differ (64 vs 80)", "transfer stage"]),
    ("architecture", ["config.json model_type is 'mistral'"]),
    ("dtype", ["'lm_head.weight' is float32", "but bfloat16"]),
])
def test_merge_mismatch_is_refused_before_anything_is_written(merge_trio, tmp_path, case, expect):
    base, a, _ = merge_trio
    bad = {
        "names": lambda d: with_renamed_tensor(a, d),
        "shapes": lambda d: make_tiny_llama(d, seed=3, intermediate_size=48),
        "vocab": lambda d: make_tiny_llama(d, seed=3, vocab_size=80),
        "architecture": lambda d: with_architecture(a, d),
        "dtype": lambda d: make_tiny_llama(d, seed=3, base=base, dtype=torch.bfloat16),
    }[case](tmp_path / "bad")
    ctx = merge_ctx(tmp_path)
    with pytest.raises(MergeRefused) as e:
        merge(ctx, method="task_arithmetic", base=str(base), models=models_((a, 1.0), (bad, 1.0)))
    assert_refused_cleanly(e.value, expect, ctx.work_dir)


def test_merge_refusal_on_the_command_line_exits_2_and_writes_no_model(merge_trio, tmp_path, cli):
    base, a, _ = merge_trio
    bad = make_tiny_llama(tmp_path / "bad", seed=3, vocab_size=80)
    pipe = {"name": "m", "eval": {"enabled": False},
            "stages": [{"kind": "merge", "model": str(base), "method": "ties", "models": models_((a, 1), (bad, 1))}]}
    (tmp_path / "p.yaml").write_text(json.dumps(pipe))
    r = cli("run", str(tmp_path / "p.yaml"), "--run-dir", str(tmp_path / "run"), timeout=300)
    assert_cli_refused(r, "transfer stage", tmp_path / "run")


# ----------------------------------------------------------------------------------------------- transfer


def _with_eos(src: Path, dst: Path, token: str) -> Path:
    shutil.copytree(src, dst)
    tiny_tokenizer(TINY_SOURCE_WORDS, eos=token, template=TINY_TEMPLATE).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("case, role, expect", [
    ("names", "target_base", ["'model.layers.1.mlp.gate_proj.extra'", "is in", "but not in"]),
    ("shapes", "target_base", ["'model.layers.0.mlp.down_proj.weight' has shape [16, 48]"]),
    ("hidden", "target_base", ["'lm_head.weight' has shape [17, 24]"]),
    ("source_vocab", "source_finetuned", ["source vocabularies differ", "token 'w11'"]),
    ("source_rows", "source_finetuned", ["'lm_head.weight' has shape [16, 16]",
                                         "the source models must share every shape"]),
    ("source_dtype", "source_finetuned", ["'lm_head.weight' is float32", "but bfloat16", "one dtype"]),
    ("architecture", "target_base", ["config.json model_type is 'llama'"]),
    ("special_token", "source_finetuned", ["special token 'w9'"]),
])
def test_transfer_mismatch_is_refused_before_anything_is_written(transfer_models, tmp_path, case, role, expect):
    m = transfer_models
    renamed = TINY_SOURCE_WORDS[:-1] + ["w99"]
    bad = {
        "names": lambda d: with_renamed_tensor(m["same"], d),
        "shapes": lambda d: make_tiny_llama(d, TINY_TARGET_WORDS, seed=3, intermediate_size=48),
        "hidden": lambda d: make_tiny_llama(d, TINY_TARGET_WORDS, seed=3, hidden_size=24, intermediate_size=32),
        "source_vocab": lambda d: make_tiny_llama(d, renamed, base=m["sb"], tokenizer=tiny_tokenizer(renamed)),
        "source_rows": lambda d: make_tiny_llama(d, TINY_SOURCE_WORDS + ["w12"], seed=3),
        "source_dtype": lambda d: make_tiny_llama(d, TINY_SOURCE_WORDS, base=m["sb"], dtype=torch.bfloat16),
        "architecture": lambda d: with_architecture(m["tgt"], d),
        "special_token": lambda d: _with_eos(m["sf"], d, "w9"),  # a source word the target lacks
    }[case](tmp_path / "bad")
    ctx = transfer_ctx(tmp_path)
    with pytest.raises(TransferRefused) as e:
        transfer(ctx, m, **{role: str(bad)}, tokenizer_from="source_finetuned")
    assert_refused_cleanly(e.value, expect, ctx.work_dir)


def test_transfer_refusal_on_the_command_line_exits_2_and_writes_no_model(transfer_models, tmp_path, cli):
    bad = make_tiny_llama(tmp_path / "bad", TINY_TARGET_WORDS, seed=3, intermediate_size=48)
    pipe = {"name": "t", "eval": {"enabled": False},
            "stages": [{"kind": "transfer", "model": str(bad), "source_base": str(transfer_models["sb"]),
                        "source_finetuned": str(transfer_models["sf"])}]}
    (tmp_path / "p.yaml").write_text(json.dumps(pipe))
    r = cli("run", str(tmp_path / "p.yaml"), "--run-dir", str(tmp_path / "run"), timeout=300)
    assert_cli_refused(r, "'model.layers.0.mlp.down_proj.weight'", tmp_path / "run")
