"""Item 12: a vLLM server that does not come up, or dies mid-run, fails the stage within its timeout with the
server's last log lines, and leaves no process behind. On CPU a stand-in plays the server.

The stand-in is a small http.server script written here: it listens on 127.0.0.1 only, answers /health and
/health/, and can wait before listening, die before it listens, exit after N seconds, ignore SIGTERM, or start
a child of its own (which must die with it: the whole process group is stopped). Every test bounds its waits.
The last test runs the GRPO stage itself through the CLI, with the stand-in in place of `vllm serve`.
"""
import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from posttrain import rollout
from posttrain.rollout import RolloutServerError, VLLMServer, free_port
from tests.reliability.conftest import cli_here, error_lines

STANDIN = r'''
import http.server, os, signal, subprocess, sys, threading, time

port, delay, life = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
flags, pidfile = sys.argv[4], sys.argv[5]
print("stand-in: starting on CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
if "ignore_term" in flags:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "child" in flags:  # a worker in the server's group, as vLLM's engine processes are
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pidfile, "w") as f:
        f.write(str(child.pid))
time.sleep(delay)
if "crash_at_start" in flags:  # dies before it listens, as vLLM does when the model does not fit
    print("stand-in: CUDA error: an illegal memory access was encountered", flush=True)
    os._exit(3)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path.rstrip("/") == "/health"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"ok" if ok else b"no")

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", port), Health)
if life > 0:
    def crash():
        print("stand-in: CUDA error: an illegal memory access was encountered", flush=True)
        os._exit(3)
    threading.Timer(life, crash).start()
print("stand-in: serving", flush=True)
server.serve_forever()
'''


def _alive(pid: int) -> bool:
    """Running (a zombie counts as dead: it is gone, only its exit status waits to be collected)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid` (read from /proc, no psutil)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _gone(pids: list[int], pgid: int, within: float = 5.0) -> bool:
    """True once no pid of `pids` and no member of group `pgid` runs (an orphan is reaped by init shortly)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids) and not _group_members(pgid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def standin(tmp_path):
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)

    def make(delay=0.0, life=0.0, flags="", health_timeout_s=30.0, stop_timeout_s=5.0):
        port = free_port()
        cmd = [sys.executable, str(script), str(port), str(delay), str(life), flags or "-", str(tmp_path / "child.pid")]
        return VLLMServer(cmd, port, tmp_path / "server.log", health_timeout_s=health_timeout_s,
                          stop_timeout_s=stop_timeout_s, poll_s=0.1, log=lambda m: None)

    return make


def _child_pid(tmp_path: Path) -> list[int]:
    f = tmp_path / "child.pid"
    return [int(f.read_text())] if f.is_file() else []


@pytest.mark.timeout(60)
def test_server_becomes_healthy_and_whole_group_stops(standin, tmp_path):
    server = standin(delay=0.3, flags="child")
    with server:
        with urllib.request.urlopen(f"{server.base_url}/health/", timeout=5) as r:
            assert r.status == 200
        pid, children = server.pid, _child_pid(tmp_path)
        assert children and _alive(children[0]) and _alive(pid)
    assert _gone([pid, *children], pid)
    assert "stand-in: serving" in (tmp_path / "server.log").read_text()


@pytest.mark.timeout(60)
def test_health_timeout_fails_with_log_tail_and_leaves_no_process(standin, tmp_path):
    server = standin(delay=60, flags="child", health_timeout_s=1.5)
    start = time.monotonic()
    with pytest.raises(RolloutServerError, match=r"(?s)within 1.5s.*stand-in: starting"):
        with server:
            pytest.fail("the block must not run when the server never became healthy")
    assert time.monotonic() - start < 20
    assert _gone([server.pid, *_child_pid(tmp_path)], server.pid)


@pytest.mark.timeout(60)
def test_server_exiting_before_healthy_fails_at_once(standin, tmp_path):
    server = standin(flags="crash_at_start", health_timeout_s=30)
    start = time.monotonic()
    with pytest.raises(RolloutServerError, match=r"(?s)exited with code 3.*illegal memory access"):
        server.__enter__()
    assert time.monotonic() - start < 20  # did not sit out the 30 s health timeout
    assert _gone([server.pid], server.pid)


@pytest.mark.timeout(60)
def test_crash_mid_run_fails_the_step_with_log_tail(standin, tmp_path):
    server = standin(life=1.0, flags="child")
    with pytest.raises(RolloutServerError, match=r"(?s)exited with code 3 during training.*illegal memory access"):
        with server:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # a training loop: check() runs after every step
                server.check()
                time.sleep(0.05)
            pytest.fail("check() never noticed the dead server")
    assert _gone([server.pid, *_child_pid(tmp_path)], server.pid)


@pytest.mark.timeout(60)
def test_error_from_a_dead_server_becomes_server_error(standin):
    """The trainer's own error (a refused connection mid-generation) is replaced by one naming the server."""
    server = standin(life=0.5)
    with pytest.raises(RolloutServerError, match="illegal memory access") as info:
        with server:
            while server.proc.poll() is None:
                time.sleep(0.05)
            raise ConnectionError("connection refused")
    assert isinstance(info.value.__cause__, ConnectionError)


@pytest.mark.timeout(60)
def test_keyboard_interrupt_kills_the_server_group(standin, tmp_path):
    server = standin(flags="child")
    with pytest.raises(KeyboardInterrupt):
        with server:
            pid, children = server.pid, _child_pid(tmp_path)
            raise KeyboardInterrupt
    assert children and _gone([pid, *children], pid)


@pytest.mark.timeout(60)
def test_server_ignoring_sigterm_is_killed(standin, tmp_path):
    server = standin(flags="ignore_term,child", stop_timeout_s=0.5)
    with server:
        pid, children = server.pid, _child_pid(tmp_path)
    assert _gone([pid, *children], pid)


def _running_with(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read() and _alive(int(entry)):
                    out.append(int(entry))
        except OSError:
            continue
    return out


@pytest.mark.timeout(120)
def test_grpo_stage_fails_within_the_health_timeout_with_log_tail(world, tmp_path, capsys, monkeypatch):
    import posttrain.stages.grpo_support as grpo
    import posttrain.stages.trl_run as trl_run

    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    monkeypatch.setattr(rollout, "vllm_installed", lambda: True)  # the config accepts backend: vllm_server
    monkeypatch.setattr(grpo, "vllm_serve_command", lambda model, cfg, port, trust_remote_code=False: [
        sys.executable, str(script), str(port), "60", "0", "child", str(tmp_path / "child.pid")])
    # rollout.gpus index the parent's visible devices: [1] of "6,7" is device 7 for the server.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    trl_kwargs = {}

    def spy_trl_args(config_cls, cfg, ctx, **kw):
        trl_kwargs.update(kw)
        return trl_args(config_cls, cfg, ctx, **kw)

    trl_args = trl_run.trl_args
    monkeypatch.setattr(trl_run, "trl_args", spy_trl_args)
    run_dir = tmp_path / "run"
    start = time.monotonic()
    code, err = cli_here(capsys, "stage", "grpo", "--run-dir", str(run_dir), "--set", "eval.enabled=false",
                         "--set", "model=world", "--set", "data=[{source: verifiable, limit: 8}]",
                         "--set", "num_generations=2", "--set", "trainer.per_device_train_batch_size=4",
                         "--set", "trainer.max_steps=1", "--set", "rollout.backend=vllm_server",
                         "--set", "rollout.gpus=[1]", "--set", "rollout.health_timeout_s=2")
    took = time.monotonic() - start
    errors = error_lines(err)
    assert code == 1 and len(errors) == 1, err[-3000:]
    assert "did not answer" in errors[0] and "within 2s" in errors[0]
    # the server's last log lines follow the error
    assert "stand-in: starting on CUDA_VISIBLE_DEVICES 7" in err.split(errors[0], 1)[1]
    # TRL's client was pointed at the started server, and its NCCL group at a free port, not TRL's fixed 51216
    port = int(trl_kwargs["vllm_server_base_url"].rsplit(":", 1)[1])
    assert trl_kwargs["vllm_mode"] == "server" and trl_kwargs["vllm_group_port"] not in (51216, port, 0)
    assert took < 60, f"the stage took {took:.0f}s to fail"
    children = _child_pid(tmp_path)  # the server's own worker process, started in its group
    assert children and not _running_with(str(script))
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in children)
    assert not (run_dir / "stages" / "01_grpo").exists()


@pytest.mark.parametrize("args, error", [
    (["--set", "rollout.backend=vllm_server"],  # the server would start on GPU 0, the trainer's: NCCL refuses
     "rollout: rollout.gpus: backend vllm_server starts a vLLM server, which needs GPUs apart from training's"),
    (["--set", "rollout.backend=vllm_colocate", "--set", "rollout.tensor_parallel_size=2"],
     "rollout: rollout.tensor_parallel_size 2 with rollout.backend vllm_colocate: each colocated vLLM engine spans "
     "that many training processes, and this run has 1"),
    # read before the launch, counted as the launch will run: 2 processes, refused before any is started
    (["--launcher", "accelerate", "--num-processes", "2", "--set", "rollout.backend=vllm_colocate",
      "--set", "rollout.tensor_parallel_size=3"], "this run has 2"),
])
def test_rollout_setups_trl_would_refuse_exit_2_before_anything_runs(tmp_path, capsys, monkeypatch, args, error):
    monkeypatch.setattr(rollout, "vllm_installed", lambda: True)
    code, err = cli_here(capsys, "stage", "grpo", "--run-dir", str(tmp_path / "run"), *args)
    errors = error_lines(err)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: ") and error in errors[0], err[-2000:]
    assert not (tmp_path / "run").exists()
