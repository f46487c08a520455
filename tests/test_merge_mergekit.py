"""`posttrain merge --from-mergekit`: a mergekit YAML becomes the merge stage config written natively (names mapped,
mergekit's defaults written out), and the two merge bit for bit alike; what cannot be mapped is refused in one
line naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from posttrain.cli import _load, build_parser, main
from posttrain.merging.mergekit import from_mergekit
from posttrain.schema import ConfigError
from posttrain.stages.merge import MergeStageConfig
from tests.conftest import load_tensors
from tests.test_merge_stage import make_ctx, merge


def write(tmp_path: Path, doc: dict, name: str = "mk.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def mk_ties(base: Path, a: Path, b: Path) -> dict:
    return {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": str(base)},  # the base among the models: mergekit skips its zero task vector
                       {"model": str(a), "parameters": {"weight": 0.7, "density": 0.5}},
                       {"model": str(b), "parameters": {"weight": 0.4, "density": 0.3}}],
            "parameters": {"normalize": True, "int8_mask": True, "lambda": 0.9}}


def mk_task_arithmetic(base: Path, a: Path, b: Path) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                       {"model": str(b), "parameters": {"weight": -0.3}}],
            "parameters": {"lambda": 0.8}}


def native(method: str, base: Path, a: Path, b: Path) -> dict:
    """The same merges written as posttrain merge stages by hand."""
    if method == "ties":
        return {"kind": "merge", "method": "ties", "base": str(base),
                "models": [{"model": str(a), "weight": 0.7}, {"model": str(b), "weight": 0.4}],
                "params": {"normalize": "weights", "lam": 0.9, "density": [0.5, 0.3]}, "dtype": "float32"}
    return {"kind": "merge", "method": "task_arithmetic", "base": str(base),
            "models": [{"model": str(a), "weight": 1.0}, {"model": str(b), "weight": -0.3}],
            "params": {"lam": 0.8}, "dtype": "float32"}


@pytest.mark.parametrize("method, doc", [("ties", mk_ties), ("task_arithmetic", mk_task_arithmetic)])
def test_mergekit_yaml_merges_bit_for_bit_as_the_native_config(merge_trio, tmp_path, method, doc):
    base, a, b = merge_trio
    imported = from_mergekit(write(tmp_path, doc(base, a, b)))
    assert imported == native(method, base, a, b)
    got = load_tensors(merge(make_ctx(tmp_path / "imported"), **imported))
    want = load_tensors(merge(make_ctx(tmp_path / "native"), **native(method, base, a, b)))
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(got[name], load_tensors(base)[name])  # a merge, not a copy of the base


def test_mergekit_defaults_are_written_out_and_breadcrumbs_names_are_mapped(tmp_path):
    """mergekit's ties density defaults to 1 and its dare_ties normalize to false; breadcrumbs' gamma (top
    fraction removed) is posttrain's beta, and 1 − density − gamma (bottom removed) posttrain's gamma."""
    two = [{"model": "a"}, {"model": "b"}]
    ties = from_mergekit(write(tmp_path, {"merge_method": "ties", "base_model": "x", "models": two}))
    assert ties["params"] == {"normalize": "weights", "lam": 1.0, "density": 1.0}
    dare = from_mergekit(write(tmp_path, {"merge_method": "dare_ties", "base_model": "x", "models": two,
                                          "parameters": {"density": 0.4}}))
    assert dare["params"] == {"normalize": "none", "lam": 1.0, "density": 0.4}
    crumbs = from_mergekit(write(tmp_path, {"merge_method": "breadcrumbs", "base_model": "x", "models": [
        {"model": "a", "parameters": {"weight": 1, "density": 0.9, "gamma": 0.01}},
        {"model": "b", "parameters": {"weight": 1, "density": 0.8, "gamma": 0.05}}]}))
    assert crumbs["params"] == {"lam": 1.0, "beta": [0.01, 0.05], "gamma": [0.09, 0.15]}
    della = from_mergekit(write(tmp_path, {"merge_method": "della", "base_model": "x", "models": two,
                                           "parameters": {"density": 0.5, "epsilon": 0.1, "rescale": True}}))
    assert della["params"] == {"normalize": "weights", "lam": 1.0, "density": 0.5, "epsilon": 0.1}
    stock = from_mergekit(write(tmp_path, {"merge_method": "model_stock", "base_model": "x", "models": two}))
    assert stock["method"] == "model_stock" and stock["params"] == {}
    for cfg in (ties, dare, crumbs, della, stock):
        MergeStageConfig.model_validate(cfg)  # every import is a valid merge stage


@pytest.mark.parametrize("doc, message", [
    ({"merge_method": "sce"}, r"merge_method: 'sce' has no posttrain method \(posttrain imports linear, "),
    ({"slices": []}, "slices: layer ranges are not mapped"),
    ({"out_dtype": "bfloat16"}, "out_dtype: not a mergekit key posttrain maps"),
    ({"parameters": {"normalise": True}}, r"parameters.normalise: no posttrain parameter .*did you mean 'normalize'"),
    ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon: has no effect in mergekit's ties"),
    ({"parameters": {"rescale": True}}, "parameters.rescale: posttrain's ties never rescales"),
    ({"models": [{"model": "a", "parameters": {"weight": [0, 0.5, 1]}}]},
     r"models\[0\].parameters.weight: gradients and per-tensor filters are not mapped"),
    ({"models": [{"model": "a+lora"}]}, r"models\[0\].model: 'a\+lora': a model\+LoRA reference is not mapped"),
    ({"merge_method": "task_arithmetic", "parameters": {"normalize": True}},
     "parameters.normalize: posttrain's task_arithmetic does not divide by the summed weights"),
    ({"base_model": None}, "base_model: ties merges task vectors against a base: name it"),
])
def test_what_cannot_be_mapped_is_refused_in_one_line_naming_the_key(tmp_path, doc, message):
    full = {"merge_method": "ties", "base_model": "x", "models": [{"model": "a"}], **doc}
    path = write(tmp_path, full)
    with pytest.raises(ConfigError, match=message) as e:
        from_mergekit(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_cli_prints_the_stage_and_exits_2_on_a_refused_key(tmp_path, capsys):
    path = write(tmp_path, {"merge_method": "task_arithmetic", "base_model": "x", "models": [{"model": "a"}]})
    assert main(["merge", "--from-mergekit", str(path), "--print"]) == 0
    printed = {"name": "merge", "kind": "merge", "method": "task_arithmetic", "base": "x",
               "models": [{"model": "a", "weight": 1.0}], "params": {"lam": 1.0}, "dtype": "float32"}
    assert yaml.safe_load(capsys.readouterr().out) == printed
    # --print shows the stage with --set applied, and refuses what a run would refuse
    assert main(["merge", "--from-mergekit", str(path), "--print", "--set", "params.lam=0.5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {**printed, "params": {"lam": 0.5}}
    assert main(["merge", "--from-mergekit", str(path), "--print", "--set", "params.lamb=0.5"]) == 2
    assert "did you mean 'lam'" in capsys.readouterr().err
    args = build_parser().parse_args(["merge", "--from-mergekit", str(path), "--set", "params.lam=0.5"])
    stage = _load(args).stages[0]  # what `posttrain merge` runs: the stage, with --set applied on top
    assert (stage.kind, stage.method, stage.base, stage.params) == ("merge", "task_arithmetic", "x", {"lam": 0.5})
    bad = write(tmp_path, {"merge_method": "ties", "base_model": "x", "models": [{"model": "a"}], "slices": []},
                "b.yml")
    assert main(["merge", "--from-mergekit", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}: slices: layer ranges are not mapped: give whole models under models:"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "model_stock", "della"])
def test_the_benchs_mergekit_configs_import_to_the_method_they_time(tmp_path, method):
    """benchmarks/mergekit_cli.py times mergekit on YAMLs it writes: each reads back as the same method."""
    from benchmarks import mergekit_cli

    inputs = [tmp_path / n for n in ("base", "a", "b")]
    cmd = mergekit_cli.command(method, inputs, tmp_path / "out", 2**20, tmp_path)
    cfg = from_mergekit(Path(cmd[3]))
    assert cfg["method"] == method and [m["model"] for m in cfg["models"]] == [str(p) for p in inputs[1:]]
    MergeStageConfig.model_validate(cfg)


def test_posttrain_merge_runs_the_imported_stage_into_a_run_dir(merge_trio, tmp_path, capsys):
    """The command end to end (evals off): the run dir's merge is the native config's merge, bit for bit."""
    base, a, b = merge_trio
    path = write(tmp_path, mk_ties(base, a, b))
    run_dir = tmp_path / "run"
    assert main(["merge", "--from-mergekit", str(path), "--set", "eval.enabled=false", "--run-dir", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run_dir)
    got = load_tensors(run_dir / "stages" / "01_merge" / "model")
    want = load_tensors(merge(make_ctx(tmp_path / "native"), **native("ties", base, a, b)))
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name
