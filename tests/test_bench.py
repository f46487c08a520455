"""benchmarks/: the raw sides compare like with like, figures say when they are off goal, the README table is
replaced in place. The timings themselves are `make bench`'s business, not a test's."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import merge_worker, real, run
from benchmarks.common import Figure, measured, paired, ratio_figure, unavailable
from benchmarks.merge_data import QUICK, write_models


@pytest.mark.parametrize("kind", ["sft", "dpo"])
@pytest.mark.parametrize("block", ["world", "real"])
def test_plain_trl_script_gets_the_same_trl_config_as_the_stage(kind, block, tmp_path):
    from benchmarks.real import TRAINER
    from benchmarks.train import args_differences, class_trainer, plain_args, stage_yaml

    # "real": the stage kind's class defaults (gradient checkpointing on, AdamW), as the real-size group runs it.
    trainer = class_trainer(kind, 7, **TRAINER[kind]) if block == "real" else None
    stage = stage_yaml(kind, str(tmp_path / "model"), steps=7, trainer=trainer)
    assert args_differences(kind, stage, plain_args(kind, 7, trainer), tmp_path) == []
    changed = {**plain_args(kind, 7, trainer), "learning_rate": 1.0}
    assert args_differences(kind, stage, changed, tmp_path) == ["learning_rate"]


def test_figure_status_never_hides_an_off_goal_number():
    assert ratio_figure("x", [1.2, 1.1, 9.0], [1.0, 1.0, 1.0], 1.05).finish().status == "OFF GOAL"
    ok = ratio_figure("x", [2.0, 3.0, 1.0], [2.0, 3.0, 1.0], 1.05).finish()
    assert ok.status == "ok" and ok.value == 1.0 and ok.to_json()["met"] is True
    gone = unavailable("mergekit", "pip failed").finish()
    assert gone.status == "unavailable" and gone.value is None and gone.to_json()["met"] is False
    assert Figure("info", 3.0, None).finish().status == "info"


def test_ratio_is_the_median_of_pairs_and_pairs_alternate_order():
    calls: list[str] = []
    a, b = paired(lambda: calls.append("a") or 2.0, lambda: calls.append("b") or 1.0, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"] and a == [2.0] * 3 and b == [1.0] * 3
    assert ratio_figure("x", [3.0, 1.0, 2.0], [1.0, 1.0, 1.0], 1.0).value == 2.0


def test_readme_table_replaced_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# t\n## Benchmarks\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n## Scale\nkeep\n")
    table = run.table([Figure("merge", 4.0, 1.5).finish(), unavailable("mk", "no pip").finish()])
    assert run.update_readme(table, readme)
    text = readme.read_text()
    assert "old" not in text and "| merge | 4.00 | 1.5 | OFF GOAL |  |" in text and "| mk | - | - | unavailable |  |" in text
    assert text.startswith("# t\n## Benchmarks\n") and text.endswith("<!-- bench:end -->\n## Scale\nkeep\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not run.update_readme(table, plain) and plain.read_text() == "no markers\n"


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_merge_worker_raw_and_stage_sides(tmp_path, capsys):
    base, ft1, ft2 = write_models(tmp_path / "in", QUICK)
    assert len(list(base.glob("model-*.safetensors"))) > 1  # sharded, as the figure needs
    inputs = [str(base), str(ft1), str(ft2)]
    merge_worker.main(["raw", str(tmp_path / "raw"), str(QUICK.shard_bytes), *inputs])
    raw_report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    merge_worker.main(["task_arithmetic", str(tmp_path / "ta"), str(QUICK.shard_bytes), *inputs])
    ta_report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for report in (raw_report, ta_report):
        assert report["seconds"] > 0 and report["peak_rss_mb"] >= report["rss_after_imports_mb"] > 0
    names = set(QUICK.tensors())
    assert set(_tensors(tmp_path / "raw")) == names
    b, m1, m2, merged = _tensors(base), _tensors(ft1), _tensors(ft2), _tensors(tmp_path / "ta" / "model")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(merged[name], b[name] + (m1[name] - b[name]) + (m2[name] - b[name]), atol=1e-6)


TINY_QWEN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=640)


def test_real_model_builder_keeps_the_published_shape_but_what_is_overridden(tmp_path, world):
    published = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
    assert published.items() <= real.QWEN25_05B.items()
    manifest = real.build(tmp_path, log=lambda m: None, **TINY_QWEN)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    for key, value in {**real.QWEN25_05B, **TINY_QWEN}.items():
        if key != "rope_theta":  # transformers 5 keeps it under rope_parameters
            assert config[key] == value, key
    assert config["rope_parameters"]["rope_theta"] == 1_000_000.0
    h, i, v = 32, 64, 640
    kv = 2 * (h // 4)  # 2 KV heads of head size 8
    assert manifest["params"] == v * h + 2 * (2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * i + 2 * h) + h
    base, ft1, ft2 = (_tensors(tmp_path / n) for n in ("base", "ft1", "ft2"))
    assert "lm_head.weight" not in base  # tied, as published
    assert {t.dtype for t in base.values()} == {torch.bfloat16}
    for ft in (ft1, ft2):
        assert {k: (t.shape, t.dtype) for k, t in ft.items()} == {k: (t.shape, t.dtype) for k, t in base.items()}
        delta = (ft["model.embed_tokens.weight"].float() - base["model.embed_tokens.weight"].float()).std()
        assert 0.001 < delta < 0.004  # N(0, 0.002) task vector
    assert not torch.equal(ft1["model.norm.weight"], ft2["model.norm.weight"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ft1"))  # the merge inputs are complete HF folders
    assert tok.chat_template and len(tok) <= v


def test_only_real_selects_the_real_group_alone(monkeypatch):
    calls = []
    fake = [Figure("r", 1.0, 1.03)]
    monkeypatch.setattr(real, "figures", lambda runs, quick: calls.append((runs, quick)) or fake)
    figures = run.collect(["real"], 2, False, [])
    assert calls == [(2, False)] and [(f.name, f.status) for f in figures] == [("r", "ok")]
    assert "real" in run.GROUPS
    with pytest.raises(SystemExit) as e:
        run.main(["--only", "reall"])
    assert e.value.code == 2


def test_measured_reports_the_commands_own_peak_rss_not_the_benchs():
    import sys

    ballast = torch.ones(300 * 2**20 // 4)  # 300 MB in this process, which a plain fork+exec would report
    seconds, stdout, rss = measured([sys.executable, "-c", "print('out'); print('last')"])
    assert stdout.splitlines() == ["out", "last"] and seconds > 0 and 0 < rss < 150
    del ballast
    with pytest.raises(RuntimeError, match="exited 3"):
        measured([sys.executable, "-c", "import sys; sys.exit(3)"])


def _results(date, groups, figures, **extra):
    host = {"cpu": "cpu", "cores": 2, "memory_gb": 8.0, "gpu": None, "load_average_at_start": [1.0, 2.0, 3.0]}
    out = {"date": date, "machine": host, "runs": 3, "quick": False, "minutes": 1.0, "groups": groups,
           "figures": [{**Figure(n, v, None, group=g).finish().to_json(), "measured": date} for n, v, g in figures]}
    return {**out, "measurements": [run._measurement(out)], **extra}


def test_an_only_run_replaces_its_groups_rows_and_keeps_the_others_with_their_date():
    full = _results("2026-11-28T06:48", ["train", "merge"], [("sft", 1.0, "train"), ("old real", 9.0, "real"),
                                                             ("merge", 2.0, "merge")])
    partial = _results("2026-12-05T08:00", ["real"], [("real sft", 1.5, "real")])
    out = run.merged(full, partial)
    assert [(f["name"], f["value"], f["measured"][:10]) for f in out["figures"]] == [
        ("sft", 1.0, "2026-11-28"), ("merge", 2.0, "2026-11-28"), ("real sft", 1.5, "2026-12-05")]
    assert [m["groups"] for m in out["measurements"]] == [["train", "merge"], ["real"]]
    text = run.header(out["measurements"])
    assert text.startswith("Latest `make bench ARGS=\"--only train,merge\"` (2026-11-28") and "the real rows" in text
    again = run.merged(out, _results("2026-12-06T08:00", ["train", "merge"], [("sft", 1.1, "train")]))
    assert [(f["name"], f["value"]) for f in again["figures"]] == [("sft", 1.1), ("real sft", 1.5)]
    assert [m["date"][:10] for m in again["measurements"]] == ["2026-12-05", "2026-12-06"]
    quick = _results("2026-12-07T08:00", ["real"], [], quick=True)
    assert run.merged(out, quick) is quick
