"""Items 3 and 4: what a rerun of a finished pipeline reruns.

3. A changed byte in a finished stage's model is found on rerun (its sha256 no longer matches DONE): that stage
   and every stage after it rerun, those before it do not, and the log names the file.
4. A finished pipeline rerun skips every stage; a changed config of one stage reruns it and the stages after
   it, not those before it.

One three-stage pipeline (a -> b -> c, tiny SFT runs in this process) is run once per module; each test works
on a copy of it.
"""
import json
import shutil

import pytest
import torch

import posttrain.stages  # noqa: F401
from posttrain.config import load_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.world.tuning import world_trainer

TINY = world_trainer("sft", max_steps=3, per_device_train_batch_size=4, logging_steps=1, save_steps=2)
SOURCES = {"a": "arithmetic", "b": "reversal", "c": "facts"}


def _cfg(changed: dict | None = None):
    """The pipeline; `changed` maps a stage name to trainer fields that differ."""
    stages = [{"name": n, "kind": "sft", "data": [{"source": src, "limit": 16}],
               "trainer": {**TINY, **(changed or {}).get(n, {})}} for n, src in SOURCES.items()]
    return load_pipeline(None, data={"name": "t", "eval": {"enabled": False}, "stages": stages})


def _rerun(run_dir, changed=None) -> tuple[dict[str, str], list[str]]:
    """Run the pipeline; ({stage: "ran" | "skipped"}, log lines)."""
    logs = []
    run_pipeline(_cfg(changed), run_dir, logs.append)
    what = {}
    for line in logs:
        for name in SOURCES:
            if line.startswith(f"[0{list(SOURCES).index(name) + 1} {name}] "):
                if "done already" in line:
                    what[name] = "skipped"
                elif "] sft from" in line:
                    what[name] = "ran"
    return what, logs


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    what, _ = _rerun(run_dir)
    assert what == {"a": "ran", "b": "ran", "c": "ran"}
    return run_dir


@pytest.fixture
def run_dir(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_finished_pipeline_is_skipped_and_layout_is_complete(run_dir):
    layout = run_dir / "stages" / "01_a"
    for rel in ["model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/tokenizer_config.json",
                "model/generation_config.json", "config.yaml", "metrics.jsonl", "DONE", "trainable.json"]:
        assert (layout / rel).is_file(), rel
    assert not list((run_dir / "stages").glob(".*"))  # no temporary folder left behind
    assert [json.loads(x)["loss"] for x in (layout / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    before = {p: p.read_bytes() for p in (run_dir / "stages").rglob("DONE")}
    what, _ = _rerun(run_dir)
    assert what == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert {p: p.read_bytes() for p in (run_dir / "stages").rglob("DONE")} == before  # nothing rewritten


def test_changed_config_reruns_that_stage_and_later_ones(run_dir):
    a_done = (run_dir / "stages" / "01_a" / "DONE").read_bytes()
    what, _ = _rerun(run_dir, {"b": {"learning_rate": 5e-4}})
    assert what == {"a": "skipped", "b": "ran", "c": "ran"}
    assert (run_dir / "stages" / "01_a" / "DONE").read_bytes() == a_done
    assert "learning_rate: 0.0005" in (run_dir / "stages" / "02_b" / "config.yaml").read_text()
    what, _ = _rerun(run_dir, {"b": {"learning_rate": 5e-4}})
    assert what == {"a": "skipped", "b": "skipped", "c": "skipped"}
    what, _ = _rerun(run_dir, {"b": {"learning_rate": 5e-4}, "c": {"learning_rate": 5e-4}})
    assert what == {"a": "skipped", "b": "skipped", "c": "ran"}


def test_tampered_model_reruns_that_stage_and_later_ones_naming_the_file(run_dir):
    weights = run_dir / "stages" / "02_b" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte, in the middle of the tensors
    weights.write_bytes(bytes(data))
    what, logs = _rerun(run_dir)
    assert what == {"a": "skipped", "b": "ran", "c": "ran"}
    warning = [line for line in logs if line.startswith("[02 b] rerunning")]
    assert len(warning) == 1 and str(weights) in warning[0] and "sha256" in warning[0], logs
    what, _ = _rerun(run_dir)
    assert what == {"a": "skipped", "b": "skipped", "c": "skipped"}


def test_a_file_added_to_a_finished_model_reruns_that_stage(run_dir):
    stray = run_dir / "stages" / "02_b" / "model" / "extra.bin"
    stray.write_bytes(b"not in DONE")
    what, logs = _rerun(run_dir)
    assert what == {"a": "skipped", "b": "ran", "c": "ran"}
    assert any(line.startswith("[02 b] rerunning") and "extra.bin was added after DONE" in line for line in logs)
    assert not stray.exists()  # the rerun's folder replaced the tampered one


def test_an_interrupted_attempt_on_other_inputs_is_set_aside_not_resumed(run_dir):
    """Stage b was interrupted (its work folder holds a checkpoint), then stage a changed: b must not resume
    from checkpoints trained on a's old output. They are moved aside, logged, and removed once b is done."""
    from posttrain.pipeline import stage_config_hash
    from posttrain.rundir import RunDir

    cfg = _cfg({"a": {"learning_rate": 5e-4}})
    work = run_dir / "stages" / ".02_b.tmp"
    RunDir.prepare_work_dir(work, stage_config_hash(cfg.stages[1]), "inputs-of-the-old-a", print)
    (work / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    what, logs = _rerun(run_dir, {"a": {"learning_rate": 5e-4}})
    assert what == {"a": "ran", "b": "ran", "c": "ran"}
    assert any(".02_b.tmp: its inputs changed" in line and ".02_b.discarded" in line for line in logs), logs
    assert not any("resuming" in line for line in logs)
    assert not list((run_dir / "stages").glob(".*"))  # set aside until b finished, then removed


def test_work_dir_is_kept_for_the_same_config_and_inputs_and_set_aside_otherwise(tmp_path):
    """A typo'd config sets the attempt aside; interrupted before its first checkpoint and run with the right
    config again, the original attempt comes back with its checkpoints (the typo's empty attempt goes)."""
    from posttrain.rundir import RunDir

    work, logs = tmp_path / ".01_s.tmp", []
    RunDir.prepare_work_dir(work, "c1", "i1", logs.append)
    (work / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    RunDir.prepare_work_dir(work, "c1", "i1", logs.append)
    assert (work / "checkpoints" / "checkpoint-5").is_dir() and not logs
    RunDir.prepare_work_dir(work, "c2", "i1", logs.append)  # the typo
    assert not (work / "checkpoints").exists() and "its config changed" in logs[-1]
    [aside] = tmp_path.glob(".01_s.discarded-*")
    assert (aside / "checkpoints" / "checkpoint-5").is_dir()
    RunDir.prepare_work_dir(work, "c1", "i1", logs.append)  # the right command again
    assert (work / "checkpoints" / "checkpoint-5").is_dir() and "resuming the attempt set aside" in logs[-1]
    assert not list(tmp_path.glob(".01_s.discarded-*"))
    RunDir.prepare_work_dir(work, "c1", "i2", logs.append)  # other inputs: set aside under their own name
    (work / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    RunDir.prepare_work_dir(work, "c1", "i3", logs.append)
    assert len(list(tmp_path.glob(".01_s.discarded-*"))) == 2  # both attempts with checkpoints kept


def test_model_retrained_in_place_reruns_the_merge_that_reads_it_and_an_unread_input_does_not(merge_trio,
                                                                                              tmp_path):
    """A merge's `models:` folder is overwritten with other weights (same path, same config): the merge reruns
    and its output follows the new weights. Its `model:` input, which a merge with `base:` never loads, may
    change without rerunning it."""
    from tests.conftest import load_tensors

    base, a, b = merge_trio
    spec, unread = tmp_path / "spec", tmp_path / "unread"
    shutil.copytree(a, spec)
    shutil.copytree(a, unread)
    stage = {"name": "m", "kind": "merge", "method": "task_arithmetic", "dtype": "float64", "base": str(base),
             "model": str(unread), "models": [{"model": str(spec), "weight": 1.0}]}
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [stage]})

    def run() -> str:
        logs = []
        run_pipeline(cfg, tmp_path / "r", logs.append)
        return "skipped" if any("done already" in line for line in logs) else "ran"

    out = tmp_path / "r" / "stages" / "01_m" / "model"
    assert run() == "ran"
    shutil.copy(b / "model.safetensors", unread / "model.safetensors")
    assert run() == "skipped"
    shutil.copy(b / "model.safetensors", spec / "model.safetensors")
    assert run() == "ran"
    assert torch.equal(load_tensors(out)["lm_head.weight"], load_tensors(b)["lm_head.weight"])
