"""The Python API (posttrain.api), `posttrain push` and a pipeline's `push:` block (posttrain.push), and the
pipeline's progress lines (posttrain.progress), on one two-task world pipeline run from Python: two 3-step SFTs,
evals stubbed at lm-eval's boundary with made-up scores (as tests/test_pipeline.py does), so the records, eval.json
files and report are the pipeline's own. The hub is stubbed at HfApi's methods."""
import json
import re
import shutil
from pathlib import Path

import pytest

import posttrain as pt
from posttrain.cli import main
from posttrain.world.tuning import world_trainer

TINY = world_trainer("sft", max_steps=3, per_device_train_batch_size=4, logging_steps=1, save_steps=2)
# Four decimals (what the card shows), so a card that rounded further would not match.
FAKE = {"01_arithmetic": (0.6875, 0.3125), "02_reversal": (0.5, 0.875), "/base": (0.25, 0.125)}
KEYS = ["world_arithmetic/exact_match", "world_reversal/exact_match"]


def _fake_lm_eval(model_dir, spec, include, limit, settings, log):
    values = next(v for k, v in FAKE.items() if k in str(model_dir))
    scores = {key: {"value": v, "stderr": 0.0625} for key, v in zip(KEYS, values)}
    return {"scores": scores, "seconds": 0.0, "backend": "fake", "lm_eval": {}, "task_configs": {}}


PIPE = {"name": "two_tasks", "eval": {"limit": 4}, "stages": [
    {"name": "arithmetic", "kind": "sft", "data": [{"source": "arithmetic", "limit": 8}], "trainer": dict(TINY)},
    {"name": "reversal", "kind": "sft", "data": [{"source": "reversal", "limit": 8}], "trainer": dict(TINY)}]}


@pytest.fixture(scope="module")
def two_tasks_logged(world, tmp_path_factory):
    """pt.run of arithmetic then reversal, from a dict; (Run, run dir, the lines it logged)."""
    import evals.runner

    run_dir = tmp_path_factory.mktemp("api") / "r"
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evals.runner, "_run_lm_eval", _fake_lm_eval)
        run = pt.run(PIPE, run_dir=run_dir, log=lines.append)
    return run, run_dir, lines


@pytest.fixture(scope="module")
def two_tasks(two_tasks_logged):
    return two_tasks_logged[:2]


def test_run_prints_each_stage_start_and_end_with_elapsed_and_time_left(two_tasks_logged):
    """posttrain.progress.PipelineProgress's lines, in order around each stage's own (its "done in" and eval)."""
    *_, lines = two_tasks_logged
    d = r"(\d+m)?\d+s"
    want = [rf"\[01 arithmetic\] stage 1/2 starts: 0/2 done, {d} elapsed, time left unknown until a stage has run$",
            r"\[01 arithmetic\] done in ",
            rf"\[01 arithmetic\] stage 1/2 finished in {d}: 1/2 done, {d} elapsed, ~{d} left \({d} a stage, mean of 1\)$",
            rf"\[02 reversal\] stage 2/2 starts: 1/2 done, {d} elapsed, ~{d} left \({d} a stage, mean of 1\)$",
            r"\[02 reversal\] done in ",
            rf"\[02 reversal\] stage 2/2 finished in {d}: 2/2 done, {d} elapsed$"]
    at = 0
    for pattern in want:
        found = next((i for i in range(at, len(lines)) if re.match(pattern, lines[i])), None)
        assert found is not None, f"no line after {lines[at - 1] if at else 'the start'!r} matches {pattern!r}"
        at = found + 1


def test_run_from_python_gives_the_report_as_records(two_tasks):
    run, run_dir = two_tasks
    assert run.run_dir == run_dir and run.stage_names == ["arithmetic", "reversal"]
    assert run.models == {n: run_dir / "stages" / f"{i:02d}_{n}" / "model" for i, n in
                          [(1, "arithmetic"), (2, "reversal")]}
    written = json.loads((run_dir / "report" / "forgetting.json").read_text())
    records = list(run.report)
    assert [(r["stage"], r["key"]) for r in records] == [(s, k) for s in ["base", "arithmetic", "reversal"] for k in KEYS]
    for r in records:
        i = [s["name"] for s in written["stages"]].index(r["stage"])
        assert r["value"] == written["stages"][i]["scores"][r["key"]]["value"]
        assert r["delta_vs_base"] == written["tasks"][r["key"]]["delta_vs_base"][i]
        assert r["forgetting"] == written["tasks"][r["key"]]["forgetting"][i]
    # The made-up scores through the real report: reversal lost 0.1875 of arithmetic's 0.6875 and gained 0.75.
    last = {r["key"]: r for r in records if r["stage"] == "reversal"}
    assert last[KEYS[0]]["delta_vs_previous"] == -0.1875 and last[KEYS[1]]["delta_vs_base"] == 0.75
    assert last[KEYS[0]]["forgetting"] == 0.1875 and run.report.summary == written["summary"]
    frame = run.report.frame()
    assert list(frame["value"]) == [r["value"] for r in records]


def test_stage_from_python_runs_one_stage(world, tmp_path, capfd):
    run = pt.stage("sft", model="world", data="arithmetic", trainer=dict(TINY), eval={"enabled": False},
                   run_dir=tmp_path / "one", log=lambda m: None)
    # stderr is no terminal here: no library's bar (model loading, dataset maps) is drawn into it
    assert "%|" not in capfd.readouterr().err
    assert list(run.models) == ["sft"] and (run.models["sft"] / "config.json").is_file()
    assert run.config["stages"][0]["data"][0]["source"] == "arithmetic" and run.report is None
    assert run.config["stages"][0]["trainer"]["max_steps"] == 3


def _table(card: str, title: str) -> dict[str, list[float]]:
    """Rows of the card's table under `### title`: model -> the first number of each cell."""
    lines = card.split(f"### {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = [float(re.match(r"[+-]?[0-9.]+", c).group()) for c in cells[1:]]
    return out


def _hub_reachable(monkeypatch) -> None:
    """The hub as a logged-in, online user has it (the suite runs with HF_HUB_OFFLINE=1); its calls are stubbed."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")


def test_push_uploads_the_model_with_a_card_of_the_report(two_tasks, monkeypatch, capsys):
    import huggingface_hub

    _, run_dir = two_tasks
    _hub_reachable(monkeypatch)
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        folder = Path(folder_path)
        calls["upload"] = (repo_id, sorted(p.name for p in folder.iterdir()), (folder / "README.md").read_text())
        calls["folder"] = folder

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert main(["push", str(run_dir), "--stage", "reversal", "--repo", "org/two-tasks", "--private"]) == 0
    assert calls["create"] == ("org/two-tasks", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo, files, card = calls["upload"]
    assert repo == "org/two-tasks"
    assert {"README.md", "config.json", "model.safetensors", "pipeline.yaml", "forgetting.png"} <= set(files)
    written = json.loads((run_dir / "report" / "forgetting.json").read_text())
    keys = list(written["tasks"])
    assert _table(card, "Scores") == {r["name"]: [round(r["scores"][k]["value"], 4) for k in keys]
                                      for r in written["stages"]}
    assert _table(card, "Change vs base") == {r["name"]: [round(written["tasks"][k]["delta_vs_base"][i], 4) for k in keys]
                                              for i, r in enumerate(written["stages"])}
    lineage = card.split("## Lineage", 1)[1].split("## Forgetting", 1)[0]
    assert "| 2 | reversal | sft | reversal (first 8) | learning_rate=" in lineage and "| 0 | base | – | world |" in lineage
    assert (run_dir / "pipeline.yaml").read_text().strip() in card
    # The staging folder is gone and the stage's own folder was never written to (its DONE hashes hold).
    assert not calls["folder"].exists() and not (run_dir / "stages" / "02_reversal" / "model" / "README.md").exists()


@pytest.mark.parametrize("args, message", [
    (["--stage", "reversl"], "--stage reversl: no such stage in {run_dir} (did you mean 'reversal'?)"),
    (["--stage", "reversal", "--repo", "no-org"], "--repo no-org: expected org/name"),
])
def test_push_refuses_bad_input_in_one_line(two_tasks, capsys, args, message):
    _, run_dir = two_tasks
    full = ["push", str(run_dir), *args] + ([] if "--repo" in args else ["--repo", "org/x"])
    assert main(full) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: " + message.format(run_dir=run_dir))


def test_push_refuses_a_folder_that_is_no_run_dir(tmp_path, capsys):
    assert main(["push", str(tmp_path), "--stage", "sft", "--repo", "org/x"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: not a run dir (no pipeline.yaml)"


def test_a_refused_upload_exits_1_in_one_line_and_leaves_no_staging_folder(two_tasks, monkeypatch, capsys):
    import huggingface_hub

    _, run_dir = two_tasks
    _hub_reachable(monkeypatch)

    def create_repo(self, repo_id, **kw):
        raise RuntimeError("401 Client Error: Unauthorized\nInvalid credentials in Authorization header")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    assert main(["push", str(run_dir), "--stage", "arithmetic", "--repo", "org/x"]) == 1
    assert capsys.readouterr().err.strip() == "error: push to org/x: 401 Client Error: Unauthorized"
    assert not list(run_dir.glob(".push-*"))


def _stub_hub(monkeypatch, calls: dict, refuse: bool = False) -> None:
    import huggingface_hub

    _hub_reachable(monkeypatch)

    def create_repo(self, repo_id, **kw):
        if refuse:
            raise RuntimeError("403 Forbidden: no write access\nmore detail")
        calls["create"] = (repo_id, kw)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        folder = Path(folder_path)
        calls["upload"] = (repo_id, sorted(p.name for p in folder.iterdir()), (folder / "README.md").read_text())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


@pytest.mark.parametrize("block, stage, private", [
    ({"repo": "org/two-tasks"}, "reversal", False),  # no stage: the last one
    ({"repo": "org/arith", "stage": "arithmetic", "private": True}, "arithmetic", True),
])
def test_push_block_uploads_after_a_successful_run(two_tasks, tmp_path, monkeypatch, block, stage, private):
    """A rerun of the finished run with a `push:` block: every stage is skipped, then the stage is pushed."""
    import evals.runner

    _, run_dir = two_tasks
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)  # the module's run dir stays as the other tests read it
    calls: dict = {}
    _stub_hub(monkeypatch, calls)
    monkeypatch.setattr(evals.runner, "_run_lm_eval", _fake_lm_eval)
    lines: list[str] = []
    pt.run({**PIPE, "push": block}, run_dir=copy, log=lines.append)
    assert sum("skipped (done already)" in line for line in lines) == 2  # push: is no stage's config
    assert calls["create"] == (block["repo"], {"private": private, "exist_ok": True, "repo_type": "model"})
    repo, files, card = calls["upload"]
    assert repo == block["repo"] and {"README.md", "model.safetensors", "pipeline.yaml"} <= set(files)
    assert f"Stage `{stage}` (sft) of the posttrain pipeline `two_tasks`." in card
    assert lines[-1] == f"pushed {stage} to https://huggingface.co/{block['repo']}"


def test_push_block_refused_upload_is_one_line_and_the_run_stays_done(two_tasks, tmp_path, monkeypatch):
    import evals.runner

    from posttrain.push import PushFailed

    _, run_dir = two_tasks
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    _stub_hub(monkeypatch, {}, refuse=True)
    monkeypatch.setattr(evals.runner, "_run_lm_eval", _fake_lm_eval)
    with pytest.raises(PushFailed) as e:
        pt.run({**PIPE, "push": {"repo": "org/x"}}, run_dir=copy, log=lambda m: None)
    assert str(e.value).startswith("push: reversal to org/x: 403 Forbidden: no write access (the run is finished;")
    assert "\n" not in str(e.value)
    assert (copy / "stages" / "02_reversal" / "DONE").is_file() and not list(copy.glob(".push-*"))


@pytest.mark.parametrize("push, message", [
    ({"repo": "org/x", "stage": "reversl"}, "push.stage: no stage 'reversl' (did you mean 'reversal'?); "
                                            "stages: arithmetic, reversal"),
    ({"repo": "no-org"}, "push.repo: expected org/name, got 'no-org'"),
    ({"repo": "org/x", "privat": True}, "push.privat: unknown key (did you mean 'private'?)"),
])
def test_push_block_config_errors_at_load(push, message):
    from posttrain.config import load_pipeline
    from posttrain.schema import ConfigError

    with pytest.raises(ConfigError) as e:
        load_pipeline(None, data={**PIPE, "push": push})
    assert str(e.value) == f"<config>: {message}"


def test_posttrain_stage_reaches_the_push_block_with_set():
    from posttrain.config import stage_pipeline

    assert stage_pipeline("sft", None, ["push.repo=org/one", "push.private=true"]).push.model_dump() == \
        {"repo": "org/one", "stage": None, "private": True}


def test_a_card_names_a_pinned_hub_base_without_its_revision(tmp_path):
    """`model: org/name@rev` (a pinned hub model): the card's base_model is org/name, which the hub links."""
    from posttrain.push import render_card

    run_dir = tmp_path / "run"
    (run_dir / "stages" / "01_sft" / "model").mkdir(parents=True)
    (run_dir / "stages" / "01_sft" / "DONE").write_text("{}")
    (run_dir / "pipeline.yaml").write_text("name: p\nstages:\n  - {name: sft, kind: sft, model: 'Qwen/Qwen2.5-0.5B@a1b2c3'}\n")
    card = render_card(run_dir, "sft", "me/model")
    assert "base_model: Qwen/Qwen2.5-0.5B\n" in card


def test_push_refuses_a_stage_built_from_an_earlier_version_of_its_parent(tmp_path):
    """A parent that finished after its child (it reran, or its mitigation was undone): the child is stale and
    its card would describe a lineage it was not trained on."""
    from posttrain.config import ConfigError
    from posttrain.push import find_stage

    run_dir = tmp_path / "run"
    for i, (name, when) in enumerate([("a", "2026-12-05T10:00:05"), ("b", "2026-12-05T10:00:01")], start=1):
        (run_dir / "stages" / f"0{i}_{name}" / "model").mkdir(parents=True)
        (run_dir / "stages" / f"0{i}_{name}" / "DONE").write_text(json.dumps({"finished": when}))
    (run_dir / "pipeline.yaml").write_text("name: p\nstages:\n  - {name: a, kind: sft}\n  - {name: b, kind: sft}\n")
    find_stage(run_dir, "a")
    with pytest.raises(ConfigError, match=r"--stage b: built from an earlier version of `a`"):
        find_stage(run_dir, "b")


def test_the_api_makes_the_clis_eval_checks_before_anything_runs(tmp_path):
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError, match="on_drop: mitigate needs eval.max_drop"):
        pt.run({"eval": {"on_drop": "mitigate"}, "stages": [{"kind": "sft"}]}, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("offline, token, message", [
    (True, "hf_test", "HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it to push"),
    (False, None, "no Hugging Face token: run `hf auth login` or set HF_TOKEN"),
])
def test_push_without_the_hub_is_refused_before_anything_is_staged(two_tasks, tmp_path, monkeypatch, capsys,
                                                                    offline, token, message):
    """Offline or logged out, `posttrain push` exits 2 before staging or calling the hub, and a `push:` block is
    refused before the run starts (not after every stage has trained): one line each."""
    import huggingface_hub
    import huggingface_hub.constants

    from posttrain.schema import ConfigError

    _, run_dir = two_tasks
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    called = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: called.append(a))
    assert main(["push", str(run_dir), "--stage", "reversal", "--repo", "org/x"]) == 2
    assert capsys.readouterr().err.strip() == f"error: push: {message}"
    assert not called and not list(run_dir.glob(".push-*"))
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError) as e:
        pt.run({**PIPE, "push": {"repo": "org/x"}}, run_dir=fresh, log=lambda m: None)
    assert str(e.value) == f"push.repo org/x: {message}, or remove the `push:` block"
    assert not fresh.exists()
