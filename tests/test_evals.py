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
from posttrain.config import ConfigError, EvalConfig, load_pipeline
from posttrain.pipeline import PipelineError, run_pipeline
from posttrain.world.tuning import world_trainer

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
    # The CLI's printed table holds the same number (it prints 0.8 for some values and 0.7667 for others).
    row = next(line for line in r.stdout.splitlines() if line.startswith("|world_facts|"))
    cells = [c.strip() for c in row.split("|")]
    assert float(cells[cells.index("acc") + 2]) == pytest.approx(ours["scores"]["world_facts/acc"]["value"], abs=5e-5)


def test_log_samples_keeps_each_examples_score_and_they_average_to_the_reported_score(world):
    """eval.log_samples: per-example scores (for the claims' paired tests) whose mean is the reported score; the
    eval key names the setting only when it is on, so evals made before it existed are still reused."""
    on = EvalConfig(limit=12, log_samples=True)
    res = evaluate_model(str(world / "base"), settings=on, tasks=["world_facts", "world_arithmetic"],
                         log=lambda m: None)
    for name in ("world_facts/acc", "world_arithmetic/exact_match"):
        items = res["items"][name]
        assert items["doc_id"] == list(range(12)) and set(items["values"]) <= {0.0, 1.0}
        assert sum(items["values"]) / 12 == pytest.approx(res["scores"][name]["value"])
    assert res["key"]["log_samples"] is True
    off = evaluate_model(str(world / "base"), settings=EvalConfig(limit=12), tasks=["world_facts"], log=lambda m: None)
    assert "log_samples" not in off["key"] and "items" not in off


def test_a_dev_split_eval_says_so_in_every_eval_line(world):
    logs: list[str] = []
    evaluate_model(str(world / "base"), settings=EvalConfig(limit=4), tasks=["world_facts"], log=logs.append,
                   split="dev")
    lines = [line for line in logs if line.startswith("eval")]
    assert lines and all(line.startswith("eval (dev split): ") for line in lines), lines


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


def test_gate_stops_pipeline_naming_stage_and_task(world, tmp_path, monkeypatch):
    import evals.runner

    def fake(model_dir, *args, **kwargs):  # the stage loses 0.6 of facts (lm-eval stubbed at its boundary)
        facts = 0.2 if "01_tiny" in str(model_dir) else 0.8
        return {"scores": {"world_facts/acc": {"value": facts, "stderr": 0.01}}, "seconds": 0.0, "backend": "fake",
                "lm_eval": {}, "task_configs": {}}

    monkeypatch.setattr(evals.runner, "_run_lm_eval", fake)
    cfg = load_pipeline(None, data={
        "eval": {"limit": 10, "max_drop": {"world_facts": 0.1}},
        "stages": [{"name": "tiny", "kind": "sft", "data": [{"source": "reversal", "limit": 8}],
                    "trainer": world_trainer("sft", max_steps=2, per_device_train_batch_size=4)}]})
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


def _fake_eval(path: Path, model: str, arithmetic: float, parents: list[str] | None, key: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "scores": {"world_arithmetic/exact_match": {"value": arithmetic, "stderr": 0.0}}}
    if parents is not None:
        record["parents"] = parents
    if key is not None:
        record["key"] = key
    path.write_text(json.dumps(record))


def _key(settings: EvalConfig, model: str, **changes) -> dict:
    """The key evaluate_model records for `model` evaluated now with `settings`, with `changes` applied."""
    from evals.runner import current_eval_settings

    return {**current_eval_settings(settings), "model_sha256": f"hub:{model}", **changes}


def test_report_rerenders_recycle_then_finetune_from_eval_files(tmp_path):
    """`posttrain report` on the recycle_then_finetune layout: the transfer source's reference row comes back
    from inputs/world-sft/eval.json, and sft_from_v2 (from world-v2, the base) is measured against the base,
    not against sft_recycled before it. An eval.json without parents (an older run) reads as a chain."""
    from evals.run_report import rerender_report
    from posttrain.pipeline import Pipeline

    cfg = load_pipeline(REPO / "configs" / "pipelines" / "recycle_then_finetune.yaml")
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.yaml").write_text(yaml.safe_dump(Pipeline(cfg, run, lambda m: None)._dump(), sort_keys=False))
    evals = [("stages/00_base", "/m/world-v2", 0.125, []), ("inputs/world-sft", "/m/world-sft", 0.75, None),
             ("stages/01_transfer", "/r/01", 0.5, ["base"]), ("stages/02_sft_recycled", "/r/02", 0.625, ["transfer"]),
             ("stages/03_sft_from_v2", "/r/03", 0.25, ["base"])]
    for folder, model, value, parents in evals:
        _fake_eval(run / folder / "eval.json", model, value, parents, _key(cfg.eval, model))
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
        _fake_eval(run / folder / "eval.json", model, value, None, _key(cfg.eval, model))
    rerender_report(run)
    chain = json.loads((run / "report" / "forgetting.json").read_text())["tasks"]["world_arithmetic/exact_match"]
    assert chain["forgetting"][-1] == 0.375  # 0.625 at sft_recycled - 0.25: the sibling comparison of old

    # A reference row made with other settings is left out like a stage row, named by its path in the run dir.
    _fake_eval(run / "inputs/world-sft/eval.json", "/m/world-sft", 0.75, None, _key(cfg.eval, "/m/world-sft", seed=9))
    rerender_report(run)
    report = json.loads((run / "report" / "forgetting.json").read_text())
    assert "input:world-sft" not in [s["name"] for s in report["stages"]]
    assert report["not_comparable"] == [{"name": "input:world-sft", "eval": "inputs/world-sft/eval.json",
                                         "why": ["seed 9 (pipeline: 0)"]}]


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


# ---- the report compares like with like ------------------------------------------------------------------------


def _run_dir(tmp_path: Path, stages: list[dict], eval_block: dict) -> tuple[Path, EvalConfig]:
    """A run dir holding only pipeline.yaml, written as the pipeline writes it."""
    from posttrain.pipeline import Pipeline

    cfg = load_pipeline(None, data={"name": "p", "eval": eval_block, "stages": stages})
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.yaml").write_text(yaml.safe_dump(Pipeline(cfg, run, lambda m: None)._dump(), sort_keys=False))
    return run, cfg.eval


TWO_TASKS = [{"name": "sft_arithmetic", "kind": "sft", "data": [{"source": "arithmetic"}]},
             {"name": "sft_reversal", "kind": "sft", "data": [{"source": "reversal"}]}]


def test_report_leaves_out_evals_made_with_other_settings(tmp_path):
    """The tester's runs/pint: pipeline.yaml now says limit 50 (an interrupted rerun got as far as the base
    eval), the stages' eval.json files say 20. Their deltas would compare different example sets: they are
    left out of every metric and listed as not comparable, with why."""
    from evals.run_report import rerender_report

    run, settings = _run_dir(tmp_path, TWO_TASKS, {"limit": 50})
    _fake_eval(run / "stages/00_base/eval.json", "m/base", 0.25, [], _key(settings, "m/base"))
    for folder, parents in [("01_sft_arithmetic", ["base"]), ("02_sft_reversal", ["sft_arithmetic"])]:
        _fake_eval(run / "stages" / folder / "eval.json", f"m/{folder}", 0.75, parents,
                   _key(settings, f"m/{folder}", limit=20))
    md = rerender_report(run).read_text()
    report = json.loads((run / "report" / "forgetting.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["base"]
    assert report["not_comparable"] == [
        {"name": "sft_arithmetic", "eval": "stages/01_sft_arithmetic/eval.json", "why": ["limit 20 (pipeline: 50)"]},
        {"name": "sft_reversal", "eval": "stages/02_sft_reversal/eval.json", "why": ["limit 20 (pipeline: 50)"]}]
    assert "- `sft_reversal` (`stages/02_sft_reversal/eval.json`): limit 20 (pipeline: 50)" in md
    assert "## Not comparable" in md
    assert "(+0.500)" not in md  # no delta against the base anywhere

    # Re-evaluated with the pipeline's settings: the rows are back and nothing is flagged. A model scored on
    # plain prompts (no chat template: apply_chat_template false in its suite) compares as well.
    suite = {**_key(settings, "x")["suite"], "apply_chat_template": False}
    _fake_eval(run / "stages/01_sft_arithmetic/eval.json", "m/1", 0.75, ["base"], _key(settings, "m/1"))
    _fake_eval(run / "stages/02_sft_reversal/eval.json", "m/2", 0.5, ["sft_arithmetic"],
               _key(settings, "m/2", suite=suite))
    rerender_report(run)
    report = json.loads((run / "report" / "forgetting.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["base", "sft_arithmetic", "sft_reversal"]
    assert "not_comparable" not in report

    # Each other setting of the key, a changed task file, and an eval.json with no key at all.
    hashes = {**_key(settings, "x")["task_hashes"], "world_facts": "0" * 64}
    for changes, why in [({"seed": 1}, "seed 1 (pipeline: 0)"), ({"num_fewshot": 5}, "num_fewshot 5 (pipeline: 0)"),
                         ({"max_new_tokens": 8}, "max_new_tokens 8 (pipeline: 24)"),
                         ({"split": "dev"}, "split 'dev' (pipeline: 'test')"),
                         ({"backend": "vllm"}, "backend 'vllm' (pipeline: 'hf')"),
                         ({"suite": {**suite, "name": "standard"}}, "suite 'standard' (pipeline: 'world')"),
                         ({"task_hashes": hashes}, "task files of world_facts differ from the current ones")]:
        _fake_eval(run / "stages/02_sft_reversal/eval.json", "m/2", 0.5, ["sft_arithmetic"],
                   _key(settings, "m/2", **changes))
        rerender_report(run)
        assert json.loads((run / "report" / "forgetting.json").read_text())["not_comparable"][0]["why"] == [why]
    before_backend = {k: v for k, v in _key(settings, "m/2").items() if k != "backend"}  # an older eval.json
    _fake_eval(run / "stages/02_sft_reversal/eval.json", "m/2", 0.5, ["sft_arithmetic"], before_backend)
    rerender_report(run)
    assert "not_comparable" not in json.loads((run / "report" / "forgetting.json").read_text())
    _fake_eval(run / "stages/02_sft_reversal/eval.json", "m/2", 0.5, ["sft_arithmetic"], None)
    rerender_report(run)
    assert json.loads((run / "report" / "forgetting.json").read_text())["not_comparable"][0]["why"] == [
        "no eval settings recorded (no key)"]


def test_report_refuses_a_base_made_with_other_settings(tmp_path):
    from evals.run_report import rerender_report

    run, settings = _run_dir(tmp_path, TWO_TASKS, {"limit": 50})
    _fake_eval(run / "stages/00_base/eval.json", "m/base", 0.25, [], _key(settings, "m/base", limit=20))
    _fake_eval(run / "stages/01_sft_arithmetic/eval.json", "m/1", 0.75, ["base"], _key(settings, "m/1"))
    with pytest.raises(ConfigError, match=r"run/stages/00_base/eval.json: the base was evaluated with other settings .*"
                                          r"\(limit 20 \(pipeline: 50\)\), so no row has a base to compare with"):
        rerender_report(run)


def test_report_leaves_out_stages_built_from_an_earlier_parent(tmp_path):
    """After a rerun retrained `a` and was interrupted before `b`: b (and c, built on b) descend from the old
    a. Their DONE markers are older than a's, and they are left out until the next run retrains them."""
    from evals.run_report import rerender_report

    stages = [{"name": n, "kind": "sft", "data": [{"source": "arithmetic"}]} for n in ("a", "b", "c")]
    run, settings = _run_dir(tmp_path, stages, {"limit": 50})
    _fake_eval(run / "stages/00_base/eval.json", "m/base", 0.25, [], _key(settings, "m/base"))
    for i, (name, parent, finished) in enumerate([("a", "base", "2026-01-02T00:00:00"),
                                                  ("b", "a", "2026-01-01T00:00:01"),
                                                  ("c", "b", "2026-01-01T00:00:02")], start=1):
        folder = run / "stages" / f"{i:02d}_{name}"
        _fake_eval(folder / "eval.json", f"m/{name}", 0.5, [parent], _key(settings, f"m/{name}"))
        (folder / "DONE").write_text(json.dumps({"finished": finished}))
    rerender_report(run)
    report = json.loads((run / "report" / "forgetting.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["base", "a"]
    assert [(r["name"], r["why"]) for r in report["not_comparable"]] == [
        ("b", ["built from an earlier `a` (that stage reran, finishing at 2026-01-02T00:00:00, after this one "
               "finished at 2026-01-01T00:00:01)"]),
        ("c", ["built from `b`, which is left out as built from an earlier version itself"])]
    # A finished run: every child finished after its parent.
    (run / "stages/01_a/DONE").write_text(json.dumps({"finished": "2026-01-01T00:00:00"}))
    rerender_report(run)
    assert "not_comparable" not in json.loads((run / "report" / "forgetting.json").read_text())


def test_current_eval_settings_are_those_evaluate_model_records(world, monkeypatch):
    """What `posttrain report` compares against is what an eval made now records (else every row would read
    as not comparable, or none would)."""
    import evals.runner
    from evals.runner import current_eval_settings

    monkeypatch.setattr(evals.runner, "_run_lm_eval", lambda *a: {"scores": {}})
    for settings in (EvalConfig(limit=7, seed=3, num_fewshot=1, max_new_tokens=9), EvalConfig(limit=None)):
        key = dict(evaluate_model("org/model", settings=settings, log=lambda m: None)["key"])
        assert key.pop("model_sha256") == "hub:org/model"
        assert key == current_eval_settings(settings)


def test_in_run_report_lists_the_stages_still_to_come(world, tmp_path, monkeypatch):
    """During a (re)run the report holds the rows this run has evaluated; the stages it has not reached are
    named, not shown from an earlier attempt's eval.json (the run may retrain them)."""
    import evals.runner
    from evals.run_report import evaluate_into_run
    from posttrain.pipeline import Pipeline

    def fake(model_dir, spec, include, limit, settings, log):
        return {"scores": {"world_arithmetic/exact_match": {"value": 0.5, "stderr": 0.0}}}

    monkeypatch.setattr(evals.runner, "_run_lm_eval", fake)
    cfg = load_pipeline(None, data={"eval": {"limit": 4}, "stages": TWO_TASKS})
    pipe = Pipeline(cfg, tmp_path / "run", lambda m: None)
    report = tmp_path / "run" / "report"
    evaluate_into_run(pipe, None, "00_base", "org/base")
    assert json.loads((report / "forgetting.json").read_text())["pending"] == ["sft_arithmetic", "sft_reversal"]
    md = (report / "forgetting.md").read_text()
    assert "## Not yet evaluated in this run\n\n`sft_arithmetic`, `sft_reversal`: a row appears" in md
    for stage in cfg.stages:
        pipe.parents[stage.name] = ["base"]
        evaluate_into_run(pipe, stage, f"0x_{stage.name}", f"org/{stage.name}")
    written = json.loads((report / "forgetting.json").read_text())
    assert "pending" not in written and len(written["stages"]) == 3
    assert "Not yet evaluated" not in (report / "forgetting.md").read_text()


def test_lm_eval_runs_no_git_outside_a_checkout(world, tmp_path, monkeypatch, capfd):
    """lm-eval's `git describe` printed "fatal: not a git repository" on every eval run outside a checkout;
    the eval no longer runs it, and lm-eval's function is back in place afterwards."""
    import lm_eval
    import lm_eval.evaluator
    import lm_eval.tasks

    import evals.runner
    from evals.runner import Suite

    original = lm_eval.evaluator.get_git_commit_hash
    seen = []

    def simple_evaluate(**kwargs):  # what lm-eval does at the end of an eval
        seen.append(lm_eval.evaluator.get_git_commit_hash())
        return {"results": {"world_facts": {"acc,none": 0.5, "acc_stderr,none": 0.1}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path=None: None)
    monkeypatch.chdir(tmp_path)  # not a git checkout
    spec = Suite(name="world", tasks=["world_facts"])
    out = evals.runner._run_lm_eval(str(world / "base"), spec, None, 4, EvalConfig(backend="hf"), lambda m: None)
    assert out["scores"] == {"world_facts/acc": {"value": 0.5, "stderr": 0.1}}
    assert seen == [None]
    assert "not a git repository" not in capfd.readouterr().err
    assert lm_eval.evaluator.get_git_commit_hash is original


# ---- eval config checks, before anything runs ------------------------------------------------------------------


def _cfg(eval_block: dict, trains_on: list[str] | None = None, suite: str = "world"):
    stage = {"name": "sft_arithmetic", "kind": "sft", "data": [{"source": "arithmetic"}]}
    if trains_on is not None:
        stage["trains_on"] = trains_on
    return load_pipeline(None, data={"eval": {"suite": suite, **eval_block}, "stages": [stage]})


WORLD_TASKS = "its tasks: world_arithmetic, world_reversal, world_verifiable, world_facts, world_style"


@pytest.mark.parametrize("eval_block, trains_on, suite, error", [
    ({"max_drop": {"world_factz": 0.05}}, None, "world",
     "eval.max_drop.world_factz: no task 'world_factz' in suite 'world' (did you mean 'world_facts'"),
    ({"max_drop": {"world_facts/accc": 0.05}}, None, "world",
     "eval.max_drop.world_facts/accc: task 'world_facts' has no metric 'accc' (did you mean 'world_facts/acc'?); "
     "its keys: world_facts/acc"),
    ({"max_drop": {"world_factz/acc": 0.05}}, None, "world", "eval.max_drop.world_factz/acc: no task 'world_factz'"),
    ({}, ["world_arithmetc"], "world", "stages.sft_arithmetic.trains_on: no task 'world_arithmetc' in suite 'world' "
                                       "(did you mean 'world_arithmetic'"),
    ({}, ["world_facts/acc"], "world", "stages.sft_arithmetic.trains_on: trains_on names tasks, not task/metric keys "
                                       "(did you mean 'world_facts'?)"),
    ({"max_drop": {"gsm8kk": 0.05}}, None, "standard", "eval.max_drop.gsm8kk: no task 'gsm8kk' in suite 'standard' "
                                                       "(did you mean 'gsm8k'?)"),
    ({"suite": "wrld"}, None, "wrld", "eval.suite: unknown suite 'wrld' (did you mean 'world'?)"),
])
def test_check_eval_config_refuses_what_the_suite_never_scores(eval_block, trains_on, suite, error, monkeypatch):
    import posttrain.world
    from evals.checks import check_eval_config

    monkeypatch.setattr(posttrain.world, "world_dir", None)  # cheap: no world build, no task rendering
    with pytest.raises(ConfigError) as e:
        check_eval_config(_cfg(eval_block, trains_on, suite))
    assert str(e.value).startswith(error)  # the closest name first (did_you_mean may add others)
    assert "\n" not in str(e.value)
    if "no task" in error and suite == "world":
        assert str(e.value).endswith(WORLD_TASKS)


@pytest.mark.parametrize("eval_block, trains_on, suite", [
    ({"max_drop": {"world_facts": 0.05, "world_arithmetic/exact_match": 0.1}}, ["world_arithmetic"], "world"),
    ({"max_drop": {"mmlu_anatomy": 0.05, "gsm8k/exact_match@strict-match": 0.1}}, ["mmlu", "ifeval"], "standard"),
    ({"enabled": False, "max_drop": {"world_factz": 0.05}}, ["nope"], "world"),  # evals off: nothing reads them
])
def test_check_eval_config_accepts_what_the_gate_and_bwt_match(eval_block, trains_on, suite, monkeypatch):
    import posttrain.world
    from evals.checks import check_eval_config

    monkeypatch.setattr(posttrain.world, "world_dir", None)
    check_eval_config(_cfg(eval_block, trains_on, suite))


def test_a_real_task_the_suite_does_not_score_in_trains_on_only_warns(monkeypatch):
    """A shipped pipeline run with a custom suite: a stage's trains_on task exists (a world task) but this
    suite does not score it; backward transfer leaves that term out, so a warning, not an error."""
    import posttrain.world
    from evals.checks import check_eval_config

    monkeypatch.setattr(posttrain.world, "world_dir", None)
    warnings = []
    check_eval_config(_cfg({}, ["world_arithmetic"], "standard"), warnings.append)
    assert warnings == ["warning: stages.sft_arithmetic.trains_on: 'world_arithmetic' is not in suite 'standard'; "
                        "backward transfer leaves this stage's term out"]


def _pipeline_yamls():
    return sorted(p for p in (REPO / "configs").rglob("*.yaml") if "stages" in (yaml.safe_load(p.read_text()) or {})
                  and p.parts[-2] != "stages")


@pytest.mark.parametrize("path", _pipeline_yamls(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_pipeline_passes_check_eval_config(path):
    from evals.checks import check_eval_config

    check_eval_config(load_pipeline(path))


def test_eval_settings_do_not_depend_on_this_machines_cache_path(monkeypatch, tmp_path):
    """A run dir copied to a machine with another cache root still compares (`posttrain report` there)."""
    from evals.runner import current_eval_settings

    here = current_eval_settings(EvalConfig())
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "elsewhere"))
    assert current_eval_settings(EvalConfig()) == here


def test_a_bad_suite_file_is_one_line_naming_the_key(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("name: mine\ntasks: [world_facts]\nlimt: 3\n")
    with pytest.raises(ConfigError, match=r"^.*suite\.yaml: limt: unknown key \(did you mean 'limit'\?\)$"):
        load_suite(str(path))
    path.write_text("")
    with pytest.raises(ConfigError, match=r"suite\.yaml: name: Field required$"):
        load_suite(str(path))


@pytest.mark.parametrize("where", ["jinja", "tokenizer_config", "none"])
def test_chat_template_is_found_where_transformers_saves_it(tmp_path, where):
    """The files `_has_chat_template` reads agree with the tokenizer transformers loads from the folder."""
    from transformers import AutoTokenizer

    from evals.runner import _has_chat_template
    from tests.conftest import TINY_TEMPLATE, tiny_tokenizer, tiny_words

    tok = tiny_tokenizer(tiny_words(16), template=None if where == "none" else TINY_TEMPLATE)
    tok.save_pretrained(tmp_path)
    if where == "tokenizer_config":  # the older layout: the template inside tokenizer_config.json
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["chat_template"] = (tmp_path / "chat_template.jinja").read_text()
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        (tmp_path / "chat_template.jinja").unlink()
    assert _has_chat_template(str(tmp_path)) == bool(AutoTokenizer.from_pretrained(tmp_path).chat_template)
    assert _has_chat_template(str(tmp_path)) == (where != "none")
