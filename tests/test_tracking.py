"""`report_to:` (posttrain/tracking.py): checked at load; tensorboard event files hold each stage's training loss,
its eval scores and the forgetting report, read back here; `none` writes no event file."""
import json

import pytest

import posttrain.stages  # noqa: F401
from posttrain.config import ConfigError, load_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.world.tuning import world_trainer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = world_trainer("sft", max_steps=2, per_device_train_batch_size=4, logging_steps=1, save_steps=50)
# Fake scores by stage folder (else the base): arithmetic, then reversal. Stage a learns arithmetic, b learns
# reversal and loses some arithmetic, so BWT = 0.5 - 0.75 = -0.25.
SCORES = {"01_a": (0.75, 0.25), "02_b": (0.5, 0.75)}


def _fake_lm_eval(model_dir, *args, **kw):
    values = next((v for k, v in SCORES.items() if f"/{k}/" in str(model_dir)), (0.25, 0.25))
    scores = {f"world_{t}/exact_match": {"value": v, "stderr": 0.0} for t, v in zip(["arithmetic", "reversal"], values)}
    return {"scores": scores, "seconds": 0.0, "backend": "fake", "lm_eval": {}, "task_configs": {}}


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _stages(report_b=None):
    b = {"name": "b", "kind": "sft", "data": [{"source": "reversal", "limit": 8}], "trainer": dict(TINY)}
    if report_b is not None:
        b["report_to"] = report_b
    return [{"name": "a", "kind": "sft", "data": [{"source": "arithmetic", "limit": 8}], "trainer": dict(TINY)}, b]


def test_tensorboard_holds_loss_eval_scores_and_forgetting(world, tmp_path, monkeypatch):
    """Stage a reports to the pipeline's tensorboard, stage b opts out (`report_to: none`): a's folder holds its
    train loss, b's none; the run dir's writer holds the evals of base and a (steps 0, 1) and the report's
    forgetting matrix and BWT, equal to forgetting.json's."""
    import evals.runner

    monkeypatch.setattr(evals.runner, "_run_lm_eval", _fake_lm_eval)
    cfg = load_pipeline(None, data={"name": "tb", "report_to": ["tensorboard"], "eval": {"limit": 2},
                                    "stages": _stages(report_b="none")})
    run_dir = tmp_path / "r"
    run_pipeline(cfg, run_dir, lambda m: None)

    train = _scalars(run_dir / "stages" / "01_a" / "tensorboard")
    losses = [json.loads(x)["loss"] for x in (run_dir / "stages" / "01_a" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert [s for s, _ in train["train/loss"]] == [1, 2]
    assert [v for _, v in train["train/loss"]] == pytest.approx(losses, rel=1e-5)
    assert not list((run_dir / "stages" / "02_b").rglob("events.out.tfevents*"))

    logged = _scalars(run_dir / "tensorboard")
    assert logged["eval/world_arithmetic/exact_match"] == [(0, 0.25), (1, 0.75)]
    assert logged["eval/world_reversal/exact_match"] == [(0, 0.25), (1, 0.25)]
    report = json.loads((run_dir / "report" / "forgetting.json").read_text())
    assert report["summary"]["backward_transfer"] == pytest.approx(-0.25)
    assert logged["report/bwt"] == [(3, pytest.approx(-0.25))]
    forgetting = report["tasks"]["world_arithmetic/exact_match"]["forgetting"]
    assert forgetting[2] == pytest.approx(0.25)
    assert logged["report/forgetting/world_arithmetic/exact_match"] == [
        (row, pytest.approx(v)) for row, v in enumerate(forgetting) if v is not None]

    run_pipeline(cfg, run_dir, lambda m: None)  # a rerun (stages done, evals reused) logs each point once
    assert _scalars(run_dir / "tensorboard") == logged


def test_report_to_none_writes_no_event_file(world, tmp_path, monkeypatch):
    import evals.runner

    monkeypatch.setattr(evals.runner, "_run_lm_eval", _fake_lm_eval)
    cfg = load_pipeline(None, data={"eval": {"limit": 2}, "stages": _stages()[:1]})
    assert cfg.report_to == [] and cfg.stages[0].report_to is None
    run_pipeline(cfg, tmp_path / "r", lambda m: None)
    assert (tmp_path / "r" / "report" / "forgetting.json").is_file()
    assert not list((tmp_path / "r").rglob("events.out.tfevents*"))


@pytest.mark.parametrize("report_to, match", [
    (["tensorbord"], r"report_to.*unknown tracker 'tensorbord' \(did you mean 'tensorboard'\?\)"),
    (["all"], r"report_to.*'all' is not allowed"),
    (["none", "tensorboard"], r"report_to.*'none' cannot be combined"),
])
def test_bad_report_to_is_one_line(report_to, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_pipeline(None, data={"report_to": report_to, "stages": _stages()[:1]})
    assert "\n" not in str(e.value)
    stage = {**_stages()[0], "report_to": report_to}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.report_to"):
        load_pipeline(None, data={"stages": [stage]})


def test_missing_tracker_package_names_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to.*tracker 'wandb' needs its package: pip install wandb"):
        load_pipeline(None, data={"report_to": "wandb", "stages": _stages()[:1]})


def test_trainer_extra_report_to_points_to_the_field():
    stage = {**_stages()[0], "trainer": {**TINY, "extra": {"report_to": ["tensorboard"]}}}
    with pytest.raises(ConfigError, match=r"trainer.extra.report_to is set by posttrain .*`report_to:`"):
        load_pipeline(None, data={"stages": [stage]})


def test_trl_gets_the_stage_trackers_and_run_name(tmp_path):
    """The pipeline's trackers, unless the stage names its own, reach TRL's config with run_name
    <pipeline>/<stage>."""
    from trl import SFTConfig

    from posttrain.pipeline import Pipeline
    from posttrain.stages.base import StageContext
    from posttrain.stages.common import trl_args

    cfg = load_pipeline(None, data={"name": "p", "report_to": "tensorboard", "stages": _stages(report_b="none")})
    pipe = Pipeline(cfg, tmp_path / "r", lambda m: None)
    got = []
    for stage in cfg.stages:
        ctx = StageContext(run_dir=tmp_path, work_dir=tmp_path / stage.name, index=1, seed=0, input_model=None,
                           resolve=str, report_to=pipe._trackers(stage), run_name=f"p/{stage.name}")
        args = trl_args(SFTConfig, stage, ctx)
        got.append((args.report_to, args.run_name))
    assert got == [(["tensorboard"], "p/a"), ([], "p/b")]


def _wandb_runs(folder) -> list[dict]:
    """The offline runs under `folder`: {name, group, job, history: {key: [values]}, summary}. wandb 0.31 keeps an
    offline run only in its run-*.wandb file: LevelDB's log format (32 KiB blocks of records with a 7-byte header:
    crc, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ":W&B" header, each record a wandb Record proto."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted(folder.glob("offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        run = {"history": {}, "summary": {}}
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk
            if kind not in (1, 4):
                continue
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            what = rec.WhichOneof("record_type")
            if what == "run":
                run.update(name=rec.run.display_name, group=rec.run.run_group, job=rec.run.job_type)
            for item in (rec.history.item if what == "history" else rec.summary.update if what == "summary" else []):
                key = item.key or "/".join(item.nested_key)
                if what == "history":
                    run["history"].setdefault(key, []).append(json.loads(item.value_json))
                else:
                    run["summary"][key] = json.loads(item.value_json)
        runs.append(run)
    return runs


def test_wandb_offline_holds_training_eval_and_report_runs(world, tmp_path, monkeypatch):
    """`report_to: wandb` (offline, as a user without network runs it): TRL's training run of each stage, one
    eval run per row with its scores, and a report run with forgetting.json's BWT, grouped by the run dir and
    named <pipeline>/<stage>; all under the run dir, none in the working directory."""
    pytest.importorskip("wandb")
    import evals.runner

    monkeypatch.setattr(evals.runner, "_run_lm_eval", _fake_lm_eval)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(None, data={"name": "wb", "report_to": "wandb", "eval": {"limit": 2}, "stages": _stages()})
    run_dir = tmp_path / "r"
    run_pipeline(cfg, run_dir, lambda m: None)
    assert not (tmp_path / "wandb").exists()
    runs = {(r["name"], r["job"]): r for r in _wandb_runs(run_dir / "wandb")}
    assert set(runs) == {("wb/a", "train"), ("wb/b", "train"), ("wb/base", "eval"), ("wb/a", "eval"),
                         ("wb/b", "eval"), ("wb/report", "report")}
    assert {r["group"] for r in runs.values()} == {"r"}
    losses = [json.loads(x)["loss"] for x in (run_dir / "stages" / "01_a" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert runs["wb/a", "train"]["history"]["train/loss"] == pytest.approx(losses, rel=1e-5)
    assert runs["wb/a", "eval"]["summary"]["eval/world_arithmetic/exact_match"] == 0.75
    assert runs["wb/b", "eval"]["summary"]["eval/world_reversal/exact_match"] == 0.75
    report = json.loads((run_dir / "report" / "forgetting.json").read_text())
    assert runs["wb/report", "report"]["summary"]["report/bwt"] == pytest.approx(report["summary"]["backward_transfer"])


def _no_wandb_credentials(monkeypatch, tmp_path) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.chdir(tmp_path)


def test_wandb_without_credentials_is_refused_before_the_run(tmp_path, monkeypatch):
    """Online and logged out, wandb.init would fail (or prompt) at the first stage, after the base eval: the
    pipeline refuses before any run dir or eval, in one line; a stage's own `report_to: wandb` counts too."""
    from posttrain.pipeline import check_services

    _no_wandb_credentials(monkeypatch, tmp_path)
    cfg = load_pipeline(None, data={"name": "wb", "stages": _stages(report_b=["tensorboard", "wandb"])})
    run_dir = tmp_path / "r"
    with pytest.raises(ConfigError) as e:
        run_pipeline(cfg, run_dir, lambda m: None)
    assert str(e.value) == ("report_to: wandb has no credentials for api.wandb.ai here: run `wandb login`, set "
                            "WANDB_API_KEY, or set WANDB_MODE=offline to log locally (`wandb sync` uploads later)")
    assert not run_dir.exists()
    check_services(load_pipeline(None, data={"name": "tb", "stages": _stages(report_b="tensorboard")}))  # no wandb


@pytest.mark.parametrize("found_by", ["offline", "api_key", "netrc", "netrc_other_host", "settings"])
def test_wandb_credentials_are_found_where_wandb_looks(tmp_path, monkeypatch, found_by):
    from posttrain.tracking import wandb_problem

    _no_wandb_credentials(monkeypatch, tmp_path)
    assert wandb_problem() is not None
    if found_by == "offline":
        monkeypatch.setenv("WANDB_MODE", "offline")
    elif found_by == "api_key":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    elif found_by.startswith("netrc"):
        host = "wandb.example.org" if found_by == "netrc_other_host" else "api.wandb.ai"
        (tmp_path / "netrc").write_text(f"machine {host}\n  login user\n  password {'x' * 40}\n")
        if found_by == "netrc_other_host":  # an entry for another host is no login for api.wandb.ai ...
            assert wandb_problem() is not None
            monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # ... but is for that server
    else:
        (tmp_path / "wandb-config").mkdir()
        (tmp_path / "wandb-config" / "settings").write_text("[default]\napi_key = " + "x" * 40 + "\n")
    assert wandb_problem() is None
