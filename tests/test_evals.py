"""Evals after every stage: lm-eval numbers, the report, the gate, real-model suites (determinism and reuse:
tests/reliability/test_eval_determinism.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import posttrain.stages  # noqa: F401
from evals.runner import evaluate_model, load_suite, render_world_tasks, scores_from_results
from posttrain.config import EvalConfig, load_pipeline
from posttrain.pipeline import PipelineError, run_pipeline

REPO = Path(__file__).resolve().parent.parent


def test_scores_from_results_names_metrics():
    res = {"results": {"t": {"alias": "t", "exact_match,strip": 0.5, "exact_match_stderr,strip": 0.1,
                             "acc,none": 0.25, "acc_stderr,none": "N/A"}}}
    assert scores_from_results(res) == {"t/exact_match": {"value": 0.5, "stderr": 0.1},
                                        "t/acc": {"value": 0.25, "stderr": None}}


def test_report_number_equals_lm_eval_command_line(world, tmp_path):
    """The same model folder and task YAML through the `lm_eval` CLI gives the number our eval records."""
    include, _ = render_world_tasks(lambda m: None)
    ours = evaluate_model(str(world / "base"), settings=EvalConfig(limit=30), tasks=["world_facts"], log=lambda m: None)
    out = tmp_path / "cli"
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={world / 'base'},dtype=float32", "--device", "cpu", "--tasks", "world_facts",
           "--include_path", str(include), "--limit", "30", "--batch_size", "32", "--apply_chat_template",
           "--output_path", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    assert result["results"]["world_facts"]["acc,none"] == ours["scores"]["world_facts/acc"]["value"]
    assert f"{ours['scores']['world_facts/acc']['value']:.4f}" in r.stdout


def test_standard_suite_validates():
    suite = load_suite("standard")
    assert {"gsm8k", "mmlu", "arc_challenge"} <= set(suite.tasks) and suite.limit


def test_world_task_yaml_on_other_architecture(tmp_path):
    """A world task YAML evaluated on a tiny local Qwen2 with its own tokenizer and chat template."""
    from tests.test_sft import _other_architecture

    model_dir = tmp_path / "qwen2"
    _other_architecture(model_dir)
    res = evaluate_model(str(model_dir), settings=EvalConfig(limit=8), tasks=["world_facts", "world_arithmetic"],
                         log=lambda m: None)
    assert 0.0 <= res["scores"]["world_facts/acc"]["value"] <= 1.0
    assert "world_arithmetic/exact_match" in res["scores"]


def test_gate_stops_pipeline_naming_stage_and_task(world, tmp_path):
    cfg = load_pipeline(None, data={
        "eval": {"limit": 10, "max_drop": {"world_facts": -1.0}},  # any score fails: drop must be <= -1
        "stages": [{"name": "tiny", "kind": "sft", "data": [{"source": "reversal", "limit": 8}],
                    "trainer": {"max_steps": 2, "per_device_train_batch_size": 4}}]})
    with pytest.raises(PipelineError) as e:
        run_pipeline(cfg, tmp_path / "r", lambda m: None)
    assert "tiny" in str(e.value) and "world_facts" in str(e.value)
    for name in ("forgetting.json", "forgetting.md", "forgetting.png"):
        assert (tmp_path / "r" / "report" / name).is_file()


@pytest.mark.slow
def test_two_task_pipeline_report_holds_stage_evals(world, tmp_path, cli):
    run_dir = tmp_path / "run"
    r = cli("run", "configs/pipelines/sft_two_tasks.yaml", "--run-dir", str(run_dir),
            "--set", "stages.sft_arithmetic.trainer.max_steps=60", "--set", "stages.sft_reversal.trainer.max_steps=60",
            "--set", "eval.limit=40")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((run_dir / "report" / "forgetting.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["base", "sft_arithmetic", "sft_reversal"]
    md = (run_dir / "report" / "forgetting.md").read_text()
    for folder, stage in zip(["00_base", "01_sft_arithmetic", "02_sft_reversal"], report["stages"]):
        ev = json.loads((run_dir / "stages" / folder / "eval.json").read_text())["scores"]
        assert stage["scores"] == ev
        assert f"{ev['world_arithmetic/exact_match']['value']:.3f}" in md
    assert (run_dir / "report" / "forgetting.png").stat().st_size > 1000
    assert report["summary"]["backward_transfer"] is not None
    r2 = cli("report", str(run_dir))
    assert r2.returncode == 0 and json.loads((run_dir / "report" / "forgetting.json").read_text()) == report


def _fake_eval(path: Path, model: str, arithmetic: float, parents: list[str] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "scores": {"world_arithmetic/exact_match": {"value": arithmetic, "stderr": 0.0}}}
    if parents is not None:
        record["parents"] = parents
    path.write_text(json.dumps(record))


def test_report_rerenders_recycle_then_finetune_from_eval_files(tmp_path):
    """`posttrain report` on the recycle_then_finetune layout: the transfer source's reference row comes back
    from inputs/world-sft/eval.json, and sft_from_v2 (from world-v2, the base) is measured against the base,
    not against sft_recycled before it. An eval.json without parents (an older run) reads as a chain."""
    from evals.runner import rerender_report
    from posttrain.pipeline import Pipeline

    cfg = load_pipeline(REPO / "configs" / "pipelines" / "recycle_then_finetune.yaml")
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.yaml").write_text(yaml.safe_dump(Pipeline(cfg, run, lambda m: None)._dump(), sort_keys=False))
    evals = [("stages/00_base", "/m/world-v2", 0.125, []), ("inputs/world-sft", "/m/world-sft", 0.75, None),
             ("stages/01_transfer", "/r/01", 0.5, ["base"]), ("stages/02_sft_recycled", "/r/02", 0.625, ["transfer"]),
             ("stages/03_sft_from_v2", "/r/03", 0.25, ["base"])]
    for folder, model, value, parents in evals:
        _fake_eval(run / folder / "eval.json", model, value, parents)
    rerender_report(run)
    report = json.loads((run / "report" / "forgetting.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["base", "input:world-sft", "transfer", "sft_recycled",
                                                     "sft_from_v2"]
    assert report["stages"][1] == {"name": "input:world-sft", "folder": "inputs/world-sft", "model": "/m/world-sft",
                                   "scores": {"world_arithmetic/exact_match": {"value": 0.75, "stderr": 0.0}},
                                   "trains_on": [], "reference": True, "input_of": "transfer"}
    arith = report["tasks"]["world_arithmetic/exact_match"]
    # sft_from_v2: best ancestor (the base, 0.125) - 0.25; delta vs its parent, the base: 0.25 - 0.125.
    assert arith["forgetting"] == [0.0, None, -0.375, -0.125, -0.125]
    assert arith["delta_vs_previous"] == [None, None, 0.375, 0.125, 0.125]
    assert [b["stage"] for b in report["summary"]["branches"]] == ["sft_recycled", "sft_from_v2"]

    for folder, model, value, _ in evals:  # an older run: no parents recorded
        _fake_eval(run / folder / "eval.json", model, value, None)
    rerender_report(run)
    chain = json.loads((run / "report" / "forgetting.json").read_text())["tasks"]["world_arithmetic/exact_match"]
    assert chain["forgetting"][-1] == 0.375  # 0.625 at sft_recycled - 0.25: the sibling comparison of old


def test_a_model_without_a_chat_template_is_scored_on_plain_prompts(tmp_path):
    """The world suite applies the chat template; a base without one (GPT-2 style) is scored on plain prompts
    instead of stopping the pipeline, and its eval.json says so."""
    from tests.conftest import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "plain")  # tiny_tokenizer: no chat template
    logs = []
    res = evaluate_model(str(model_dir), settings=EvalConfig(limit=4), tasks=["world_facts"], log=logs.append,
                         out=tmp_path / "eval.json")
    assert 0.0 <= res["scores"]["world_facts/acc"]["value"] <= 1.0
    assert json.loads((tmp_path / "eval.json").read_text())["suite"]["apply_chat_template"] is False
    assert any("no chat template" in line for line in logs)
