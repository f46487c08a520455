"""The command line around a run: what it leaves behind on bad input, how it says to resume, `eval` on model
names, and a stale error.log. Config and data errors themselves: tests/reliability/test_config_errors.py."""
import argparse
import os

import yaml

from posttrain.cli import _resume_command


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_bad_input_at_run_time_leaves_no_run_dir_and_latest_where_it_was(tmp_path, cli):
    (tmp_path / "runs" / "20260101-000000-old").mkdir(parents=True)
    os.symlink("20260101-000000-old", tmp_path / "runs" / "latest")
    cfg = _write(tmp_path / "p.yaml", {"name": "p", "eval": {"enabled": False},
                                       "stages": [{"name": "s", "kind": "sft", "model": "no-such-world-model"}]})
    r = cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 2 and "no-such-world-model" in r.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20260101-000000-old", "latest"]
    assert os.readlink(tmp_path / "runs" / "latest") == "20260101-000000-old"


def test_run_dir_that_is_a_file_and_a_one_process_launch_are_refused(tmp_path, cli):
    (tmp_path / "afile").write_text("x")
    r = cli("stage", "sft", "--run-dir", str(tmp_path / "afile"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: --run-dir {tmp_path / 'afile'}: exists and is not a folder"
    r = cli("stage", "sft", "--launcher", "accelerate", "--num-processes", "1", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "--num-processes must be at least 2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


def test_resume_command_names_the_run_dir_a_default_run_got(monkeypatch):
    monkeypatch.setattr("posttrain.cli._program", lambda: ["posttrain"])
    args = argparse.Namespace(argv=["run", "my pipe.yaml", "--set", "seed=1"], run_dir=None)
    assert _resume_command(args, "runs/20261128-0101-p") == \
        "posttrain run 'my pipe.yaml' --set seed=1 --run-dir runs/20261128-0101-p"
    args = argparse.Namespace(argv=["stage", "sft", "--run-dir", "r"], run_dir="r")
    assert _resume_command(args, "r") == "posttrain stage sft --run-dir r"


def test_hints_name_posttrain_as_the_user_can_run_it(tmp_path, monkeypatch):
    """`make stage=sft` runs .venv/bin/posttrain, which is not on PATH: the resume hint says that path."""
    import sys

    from posttrain.cli import _program

    exe = tmp_path / ".venv" / "bin" / "posttrain"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [".venv/bin/posttrain", "stage", "sft"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert _program() == [".venv/bin/posttrain"]
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin:/bin")  # an activated venv
    assert _program() == ["posttrain"]
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "elsewhere" / "__main__.py")])  # python -m posttrain
    assert _program()[1:] == ["-m", "posttrain"]


def test_eval_refuses_a_missing_folder_and_a_bad_limit_in_one_line(tmp_path, cli):
    r = cli("eval", str(tmp_path / "nope"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr
    r = cli("eval", "world", "--limit", "0")
    assert r.returncode == 2 and r.stderr.strip() == "error: --limit must be at least 1, got 0"
    reward = tmp_path / "reward"  # a reward stage's output: lm-eval would give it a random LM head
    reward.mkdir()
    (reward / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"], "num_labels": 1}')
    r = cli("eval", str(reward))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "a sequence classifier (a reward model) scores text and does not generate" in r.stderr


def test_a_successful_run_removes_an_earlier_failures_error_log(merge_trio, tmp_path, cli):
    base, a, _ = merge_trio
    from posttrain.rundir import mark_run_dir

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    mark_run_dir(run_dir, "pipeline")  # the run dir of the failed run, as posttrain made it
    (run_dir / "error.log").write_text("Traceback of an earlier failure\n")
    cfg = _write(tmp_path / "m.yaml", {"eval": {"enabled": False}, "stages": [
        {"name": "m", "kind": "merge", "method": "task_arithmetic", "base": str(base), "models": [{"model": str(a)}]}]})
    r = cli("run", cfg, "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(run_dir) and not (run_dir / "error.log").exists()


def test_list_shows_every_key_a_pipeline_can_hold(capsys):
    """Top-level and eval keys, every stage kind, data-source and reward fields with defaults, the fields of an
    unset optional block, the built-in rewards' params and the merge methods."""
    from posttrain.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for expected in ["pipeline (top level):", "  push: None  (when set: {repo: org/name", "    max_drop: {}", "    on_drop: 'stop'", "\nsft: ", "\ntransfer: ",
                     "'on_bad_rows': 'error'", "'timeout_s': 5.0", "lora: None  (when set: r=16", "use_dora=False, quantize=None)",
                     "  format_regex: params pattern", "  length_penalty: params target_len, scale=0.001",
                     "merge methods (merge `method:`): breadcrumbs,"]:
        assert expected in out, expected


def test_drop_records_after_keeps_events_and_earlier_steps(tmp_path):
    from posttrain.stages.common import drop_records_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "data"}\n{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                    '{"step": 3, "loss": 1.0}\n{"step": 3, "lo')  # the last line cut by a kill
    assert drop_records_after(path, 2) == 2
    assert path.read_text() == '{"event": "data"}\n{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_a_max_drop_typo_exits_2_before_the_run_dir_exists(tmp_path, cli):
    r = cli("stage", "sft", "--set", "eval.max_drop.world_factz=0.05", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr.startswith("error: eval.max_drop.world_factz: no task 'world_factz'")
    assert "did you mean 'world_facts'" in r.stderr and not (tmp_path / "r").exists()


def test_sigterm_unwinds_like_ctrl_c_and_prints_the_resume_command(tmp_path):
    """`timeout`, Slurm and Kubernetes stop a job with SIGTERM: the run stops cleanly (exit 143, the run dir
    unlocked, the resume command printed), and that command resumes it."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, run_cli

    run_dir = tmp_path / "r"
    args = ["stage", "sft", "--set", "eval.enabled=false", "--set", "trainer.max_steps=2000",
            "--set", "trainer.save_steps=5", "--run-dir", str(run_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", *args], cwd=REPO, stderr=subprocess.PIPE, text=True)
    checkpoints = run_dir / "stages" / ".01_sft.tmp" / "checkpoints"
    deadline = time.time() + 300
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    # python -m posttrain, as the test started it, from the checkout: the hint names that python
    python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    assert f"terminated; resume with: {python} -m posttrain stage sft" in err and f"--run-dir {run_dir}" in err
    r = run_cli(*args[:-2], "--set", "trainer.max_steps=10", "--run-dir", str(run_dir))  # not locked: it runs
    assert r.returncode == 0 and "its config changed" in r.stderr, r.stderr[-2000:]


def test_eval_opt_ins_and_bad_paths_are_one_line(tmp_path, cli):
    from tests.conftest import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    r = cli("eval", str(folder))
    assert r.returncode == 2 and "pass --allow-pickle" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "afile").write_text("x")
    r = cli("eval", "world", "--out", str(tmp_path / "afile" / "eval.json"))
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr
    r = cli("eval", "world-v3")
    assert r.returncode == 2 and "'world-v2'" in r.stderr  # every world model is known to eval
