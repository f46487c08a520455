"""Merge stage, run directly on tiny Llamas (tests/conftest.py): identities (one model at weight 1 is that model,
weight 0 is the base bit for bit), sharded inputs equal the in-memory merge, the output loads and carries the
base's tokenizer, LoRA adapters are merged into their base first, config errors, and the coefficient search with
an injected scorer. The refusals are in tests/reliability/test_merge_transfer_refusals.py. Slow tests run
`posttrain stage merge` and configs/pipelines/merge_specialists.yaml on the world."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import posttrain.stages  # noqa: F401  (registers the stage kinds)
from posttrain.stages import combine
from posttrain.config import ConfigError, stage_pipeline
from posttrain.merging.methods import dare_ties, task_arithmetic, ties
from posttrain.models import ModelError, resolve_model
from posttrain.stages.base import StageContext
from posttrain.merging.stream import model_generators
from posttrain.stages.merge import MergeStageConfig, run
from posttrain.tensors import INDEX_FILE
from tests.conftest import load_tensors, make_tiny_llama
from tests.test_report import check_run_summary


# ----------------------------------------------------------------------------------------------- helpers


def make_ctx(tmp_path: Path, input_model: str | None = None, index: int = 1, **extra) -> StageContext:
    run_dir = tmp_path / "run"
    work = run_dir / "stages" / f".{index:02d}_merge.tmp"
    work.mkdir(parents=True, exist_ok=True)
    return StageContext(run_dir=run_dir, work_dir=work, index=index, seed=0, input_model=input_model,
                        resolve=lambda r: resolve_model(r, log=lambda m: None), log=lambda m: None, extra=extra)


def merge(ctx: StageContext, **cfg) -> Path:
    result = run(MergeStageConfig.model_validate({"kind": "merge", **cfg}), ctx)
    assert result.model_dir == ctx.work_dir / "model"
    return result.model_dir


def models_(*pairs) -> list[dict]:
    return [{"model": str(m), "weight": w} for m, w in pairs]


# ----------------------------------------------------------------------------------------------- identities


def test_task_arithmetic_one_model_weight_one_is_that_model(merge_trio, tmp_path):
    base, a, _ = merge_trio
    out = merge(make_ctx(tmp_path), method="task_arithmetic", base=str(base), models=models_((a, 1.0)),
                dtype="float64")
    got, want = load_tensors(out), load_tensors(a)
    assert sorted(got) == sorted(want)
    for name in want:
        # base + 1·(a − base) in float64 is exact for float32 inputs, so the cast back gives a bit for bit.
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs"])
def test_zero_coefficients_give_the_base_bit_exact(merge_trio, tmp_path, method):
    base, a, b = merge_trio
    out = merge(make_ctx(tmp_path, input_model=str(base)), method=method, models=models_((a, 0.0), (b, 0.0)))
    got, want = load_tensors(out), load_tensors(base)
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name].view(torch.int32), want[name].view(torch.int32)), name


def test_sharded_inputs_equal_the_in_memory_merge(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0, tokenizer=True, shard="10KB")
    a = make_tiny_llama(tmp_path / "a", seed=1, base=base, shard="10KB")
    b = make_tiny_llama(tmp_path / "b", seed=2, base=base)  # one file: sharded and unsharded inputs mix
    assert len(list(base.glob("*.safetensors"))) > 1 and (base / INDEX_FILE).is_file()
    out = merge(make_ctx(tmp_path), method="dare_ties", base=str(base), models=models_((a, 0.7), (b, 0.4)),
                params={"density": 0.5}, seed=3, max_shard_bytes=8_000)

    assert len(list(out.glob("*.safetensors"))) > 1 and (out / INDEX_FILE).is_file()
    got = load_tensors(out)
    tb, ta, tbb = load_tensors(base), load_tensors(a), load_tensors(b)
    # The stage's contract: one generator per model (model_generators), tensors in sorted-name order.
    gens = model_generators(3, 2)
    for name in sorted(tb):
        want = dare_ties(tb[name], [ta[name], tbb[name]], [0.7, 0.4], generator=gens, density=0.5)
        assert torch.equal(got[name], want.to(tb[name].dtype)), name
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], tb["model.layers.0.mlp.up_proj.weight"])


@pytest.fixture(scope="module")
def bf16_trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16_trio")
    base = make_tiny_llama(root / "base", seed=0, dtype=torch.bfloat16)
    return (base, make_tiny_llama(root / "a", seed=1, base=base, dtype=torch.bfloat16),
            make_tiny_llama(root / "b", seed=2, base=base, dtype=torch.bfloat16))


@pytest.mark.parametrize("method, params", [("task_arithmetic", {"lam": 0.8}), ("ties", {"density": 0.3}),
                                            ("dare_linear", {"density": 0.4}), ("dare_ties", {"density": 0.5}),
                                            ("linear", {}), ("ties", {"density": [0.3, 0.6]}),
                                            ("della", {"density": 0.5, "epsilon": 0.2})])
@pytest.mark.parametrize("trio", ["merge_trio", "bf16_trio"])
@pytest.mark.parametrize("cache_bytes", [0, 2**30], ids=["read-twice", "read-once"])
def test_sliced_merge_equals_the_whole_tensor_merge(request, tmp_path, monkeypatch, method, params, trio,
                                                    cache_bytes):
    """Slices of 96 elements (the tiny tensors hold 16-1024) give the bits of one whole-tensor call per name:
    TIES with its thresholds found by sample and count (inputs read per slice, or once whole), DARE with each
    model's stream running on."""
    from posttrain import registry as merge_methods
    from posttrain.merging import stream as merge_stream

    monkeypatch.setattr(merge_stream, "SLICE", 96)
    monkeypatch.setattr(merge_stream, "CACHE_BYTES", cache_bytes)
    base, a, b = request.getfixturevalue(trio)
    out = merge(make_ctx(tmp_path), method=method, base=str(base), models=models_((a, 0.6), (b, 0.5)),
                params=params, seed=4)
    got, tb, ta, tbb = load_tensors(out), load_tensors(base), load_tensors(a), load_tensors(b)
    fn, gens = merge_methods.MERGE_METHODS.get(method), model_generators(4, 2)
    for name in sorted(tb):
        whole = fn(None if method == "linear" else tb[name], [ta[name], tbb[name]], [0.6, 0.5], generator=gens,
                   **params)
        assert got[name].dtype == tb[name].dtype
        assert torch.equal(got[name].view(torch.uint8), whole.to(tb[name].dtype).view(torch.uint8)), name


def test_slerp_gets_whole_tensors_and_interpolates_base_and_one_model(merge_trio, tmp_path, monkeypatch):
    """SLERP declares WHOLE streaming (its angle is over the whole tensor): with 96-element slices it still gets
    each tensor at once, so the stage writes slerp(base, model) of every tensor; two models are refused at load."""
    from posttrain.merging import stream
    from posttrain.merging.methods import slerp

    monkeypatch.setattr(stream, "SLICE", 96)
    base, a, b = merge_trio
    out = merge(make_ctx(tmp_path), method="slerp", base=str(base), models=models_((a, 1.0)), params={"t": 0.3})
    got, tb, ta = load_tensors(out), load_tensors(base), load_tensors(a)
    assert sorted(got) == sorted(tb)
    for name in sorted(tb):
        assert torch.equal(got[name], slerp(tb[name], [ta[name]], [1.0], t=0.3).to(tb[name].dtype)), name
    with pytest.raises(ConfigError, match="slerp interpolates the base and one model; got 2 models"):
        stage_pipeline("merge", None, ["method=slerp", "params={t: 0.5}"])


@pytest.mark.parametrize("density", [0.2, [0.2, 0.5]], ids=["one-density", "density-per-model"])
@pytest.mark.parametrize("cache_bytes", [0, 2**30], ids=["read-twice", "read-once"])
@pytest.mark.parametrize("window", [-1.0, float("inf")], ids=["kth-above-window", "kth-below-window"])
def test_ties_thresholds_are_exact_when_the_sample_window_misses(merge_trio, tmp_path, monkeypatch, cache_bytes,
                                                                window, density):
    """A window that misses the k-th magnitude (below every |τ|, or above) sends each model through a second
    pass over the side the count points to; the merge is still the whole-tensor TIES, bit for bit."""
    from posttrain.merging import stream as merge_stream

    monkeypatch.setattr(merge_stream, "SLICE", 96)
    monkeypatch.setattr(merge_stream, "CACHE_BYTES", cache_bytes)
    monkeypatch.setattr(merge_stream, "_windows", lambda src, active, qs, row: [(window, window)] * len(active))
    passes = []
    count_pass = merge_stream._count_pass
    monkeypatch.setattr(merge_stream, "_count_pass", lambda *a: passes.append(a[2]) or count_pass(*a))
    base, a, b = merge_trio
    out = merge(make_ctx(tmp_path), method="ties", base=str(base), models=models_((a, 1.0), (b, 1.0)),
                params={"density": density})
    assert any(len(w) == 1 for w in passes)  # second passes, one model at a time, ran
    got, tb, ta, tbb = load_tensors(out), load_tensors(base), load_tensors(a), load_tensors(b)
    for name in sorted(tb):
        assert torch.equal(got[name], ties(tb[name], [ta[name], tbb[name]], [1.0, 1.0], density=density)), name


def test_output_loads_and_has_the_base_config_and_tokenizer(merge_trio, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, a, b = merge_trio
    out = merge(make_ctx(tmp_path), method="ties", base=str(base), models=models_((a, 1.0), (b, 1.0)),
                params={"density": 0.5})
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 64
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] + \
             (["generation_config.json"] if (base / "generation_config.json").is_file() else []):
        assert (out / f).read_bytes() == (base / f).read_bytes(), f
    assert AutoTokenizer.from_pretrained(out).eos_token == "<eos>"
    assert not (tmp_path / "run" / "stages" / ".01_merge.tmp" / "inputs").exists()
    summary = json.loads((out.parent / "merge.json").read_text())
    assert summary["method"] == "ties" and summary["weights"] == [1.0, 1.0]


# ----------------------------------------------------------------------------------------------- stage refs


def test_stage_ref_resolves_to_an_earlier_stage_and_unknown_names_are_refused(merge_trio, tmp_path):
    base, a, _ = merge_trio
    earlier = tmp_path / "run" / "stages" / "01_spec_a" / "model"
    shutil.copytree(a, earlier)
    out = merge(make_ctx(tmp_path, index=2), method="task_arithmetic", base=str(base),
                models=[{"model": "${stages.spec_a.model}", "weight": 1.0}], dtype="float64")
    assert torch.equal(load_tensors(out)["lm_head.weight"], load_tensors(a)["lm_head.weight"])
    with pytest.raises(ModelError, match="did you mean 'spec_a'"):
        merge(make_ctx(tmp_path, index=2), method="linear",
              models=[{"model": "${stages.spec_b.model}", "weight": 1.0}])


# ----------------------------------------------------------------------------------------------- LoRA


def test_lora_adapter_is_merged_into_its_base_first(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_tiny_llama(tmp_path / "base", seed=0, tokenizer=True)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # lora_B starts at 0; non-zero so the adapter changes weights
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    want = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}

    ctx = make_ctx(tmp_path)
    out = merge(ctx, method="task_arithmetic", base=str(base), models=models_((adapter, 1.0)), dtype="float64")
    got, tb = load_tensors(out), load_tensors(base)
    assert sorted(got) == sorted(tb)
    changed = [n for n in got if not torch.equal(tb[n], want[n])]
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    assert not (ctx.work_dir / "inputs").exists()  # the temporary merged adapter is gone


# ----------------------------------------------------------------------------------------------- config


def test_unknown_method_is_a_config_error_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"method: unknown merge method 'tiez' \(did you mean 'ties'"):
        stage_pipeline("merge", None, ["method=tiez"])
    with pytest.raises(ConfigError, match=r"params.densty: not a parameter of ties \(did you mean 'density'"):
        stage_pipeline("merge", None, ["params.densty=0.3"])
    with pytest.raises(ConfigError, match="density must be in"):
        stage_pipeline("merge", None, ["params.density=2"])
    with pytest.raises(ConfigError, match="grid has 9 points"):
        stage_pipeline("merge", None, ["search={metric: world_arithmetic/exact_match, space: [0, 0.5, 1], trials: 4}"])


def test_default_config_merges_the_world_specialists_with_ties():
    cfg = MergeStageConfig()
    assert cfg.method == "ties" and [m.model for m in cfg.models] == ["world-sft-arithmetic", "world-sft-reversal"]


# ----------------------------------------------------------------------------------------------- search


def test_grid_search_records_every_trial_and_keeps_the_best(merge_trio, tmp_path, monkeypatch):
    base, a, b = merge_trio
    tb, ta, tbb = load_tensors(base), load_tensors(a), load_tensors(b)
    name = "model.layers.0.self_attn.q_proj.weight"
    target = task_arithmetic(tb[name], [ta[name], tbb[name]], [0.5, 0.5])
    scored: list[Path] = []

    def scorer(model_dir: Path) -> float:  # closeness to the c = 0.5 merge: trial 1 of [0, 0.5, 1] wins
        scored.append(model_dir)
        return -float((load_tensors(model_dir)[name] - target).abs().sum())

    monkeypatch.setattr(combine, "eval_scorer", lambda search, log: scorer)
    ctx = make_ctx(tmp_path)
    search = {"method": "grid", "space": [0.0, 0.5, 1.0], "scope": "shared", "metric": "world_arithmetic/exact_match"}
    out = merge(ctx, method="task_arithmetic", base=str(base), models=models_((a, 1.0), (b, 1.0)), search=search)

    lines = [json.loads(x) for x in (ctx.work_dir / "search.jsonl").read_text().splitlines()]
    assert [x["trial"] for x in lines] == [0, 1, 2, 1] and lines[-1]["best"] is True
    assert [x["weights"] for x in lines[:3]] == [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]
    assert lines[1]["score"] == 0.0 and lines[0]["score"] < 0 and lines[2]["score"] < 0
    assert len(scored) == 3
    torch.testing.assert_close(load_tensors(out)[name], target, rtol=0, atol=1e-6)
    assert not (ctx.work_dir / "search").exists()
    assert json.loads((ctx.work_dir / "merge.json").read_text())["search_best_trial"] == 1


def test_random_per_block_search_draws_one_coefficient_per_model_and_block(merge_trio, tmp_path):
    base, a, b = merge_trio
    ctx = make_ctx(tmp_path, merge_scorer=lambda d: 0.0)  # injected through ctx.extra
    search = {"method": "random", "space": {"low": 0.0, "high": 1.0}, "scope": "per_block", "trials": 3,
              "metric": "world_arithmetic/exact_match"}
    merge(ctx, method="task_arithmetic", base=str(base), models=models_((a, 1.0), (b, 1.0)), search=search)
    lines = [json.loads(x) for x in (ctx.work_dir / "search.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[-1]["trial"] == 0  # all tie at 0.0: the first trial is kept
    for x in lines[:3]:
        assert sorted(x["per_block"]) == ["embed", "layers.0", "layers.1", "lm_head", "norm"]
        assert all(len(v) == 2 and all(0.0 <= c <= 1.0 for c in v) for v in x["per_block"].values())
    assert len({json.dumps(x["per_block"]) for x in lines[:3]}) == 3


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_merges_the_world_specialists(cli, tmp_path):
    """`posttrain stage merge` on a fresh run dir: trains (or reuses) the cached specialists, merges, evaluates.

    TIES of the world's SFT specialists (the class default `models:`), not the shipped merge.yaml's DPO and GRPO
    specialists: those cost the suite minutes more of training, for the same path through the CLI."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    config = tmp_path / "merge.yaml"
    config.write_text("kind: merge\nmethod: ties\nbase: world\ntrains_on: [world_arithmetic, world_reversal]\n")
    r = cli("stage", "merge", "--config", str(config), "--run-dir", str(run_dir), "--set", "max_shard_bytes=1000000",
            "--set", "eval.limit=40", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    check_run_summary(r.stderr, run_dir)  # the specialists are reference rows, not stages of the table
    assert "world note: it CANNOT show merges of specialists fine-tuned far from their base" in r.stderr
    stage_dir = run_dir / "stages" / "01_merge"
    assert (stage_dir / "DONE").is_file()
    assert len(list((stage_dir / "model").glob("*.safetensors"))) > 1
    assert AutoModelForCausalLM.from_pretrained(stage_dir / "model") is not None
    # The report shows the base, each specialist (a reference row with its own eval.json) and the merge.
    rows = json.loads((run_dir / "report" / "forgetting.json").read_text())["stages"]
    specialists = ["world-sft-arithmetic", "world-sft-reversal"]
    assert [r["name"] for r in rows] == ["base"] + [f"input:{m}" for m in specialists] + ["merge"]
    for row, name in zip(rows[1:3], specialists):
        measured = json.loads((run_dir / "inputs" / name / "eval.json").read_text())
        assert row["reference"] and row["scores"] == measured["scores"]
    key = "world_arithmetic/exact_match"
    assert rows[1]["scores"][key]["value"] > rows[0]["scores"][key]["value"]  # the arithmetic specialist
    md = (run_dir / "report" / "forgetting.md").read_text()
    assert all(f"| input:{m} " in md for m in specialists)


# ----------------------------------------------------------------------------------------------- memory

_PEAK_CHILD = r"""
import json, sys, torch
from pathlib import Path
import posttrain.stages.merge as m
from posttrain.stages.base import StageContext

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
try:  # reset the high-water mark to the current RSS, so that imports do not count (Linux >= 4.0)
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    pass
start = status("VmRSS")
base, *models = sys.argv[2:]
cfg = m.MergeStageConfig(method="ties", base=base, models=[{"model": p} for p in models],
                         max_shard_bytes=40 * 2**20)
out = Path(sys.argv[1])
ctx = StageContext(run_dir=out, work_dir=out, index=1, seed=0, input_model=base, resolve=lambda r: r,
                   log=lambda msg: None)
m.run(cfg, ctx)
print(json.dumps({"start": start, "peak": status("VmHWM")}))
"""


def test_merge_peak_memory_stays_near_a_few_slices(tmp_path):
    """A TIES merge of 3 x 96 MB sharded models (4 tensors of 24 MB) grows the process by at most 32 MB (25
    measured): ~20 slice buffers of 1 MiB, the window entries of the trim thresholds and the sample, whatever
    the tensor's size. Whole tensors would cost (models + 3) x 24 = 144 MB; memory maps or a buffered shard
    100-300 MB."""
    import os
    import subprocess
    import sys

    from posttrain.tensor_writer import ShardedWriter

    numel, count = 6 * 2**20, 4  # float32: 24 MiB per tensor, over merge_stream.CACHE_BYTES for 3 inputs
    g = torch.Generator().manual_seed(0)
    folders = [tmp_path / n for n in ("base", "a", "b")]
    writers = [ShardedWriter(f, max_shard_bytes=40 * 2**20) for f in folders]
    for i in range(count):
        base = torch.randn(numel, generator=g)
        writers[0].add(f"model.layers.{i}.mlp.up_proj.weight", base)
        for w in writers[1:]:
            w.add(f"model.layers.{i}.mlp.up_proj.weight", base + 0.1 * torch.randn(numel, generator=g))
    for w, f in zip(writers, folders):
        w.close()
        (f / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    # A fixed mmap threshold: glibc's default raises it to the size of each freed block, so freed blocks stay
    # in the heap; the bound is on what the merge holds, not on that.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path / "out"), *map(str, folders)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    grown_mb = (got["peak"] - got["start"]) / 2**20
    assert grown_mb <= 32, f"the merge grew the process by {grown_mb:.0f} MB"
    assert len(list((tmp_path / "out" / "model").glob("*.safetensors"))) == 4  # 24 MB tensors, 40 MB shards


def test_merge_progress_counts_every_tensor_byte_in_order(merge_trio, monkeypatch):
    """with_progress yields the names in order and its bar ends at the bytes of all of them."""
    import tqdm.auto

    from posttrain.merging.stream import with_progress
    from posttrain.tensors import ShardedReader

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, k):
            self.n += k

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    with ShardedReader(merge_trio[0]) as reader:
        names = reader.names()
        assert list(with_progress(names, reader, "merge")) == names
        expected = sum(reader.get(n).numel() * reader.get(n).element_size() for n in names)
    assert [(b.total, b.n) for b in bars] == [(expected, expected)]
