"""Rollout backends: config checks, GRPOConfig mapping, and the vLLM server's lifecycle with a stand-in server.

The stand-in is a small http.server script written here: it listens on 127.0.0.1 only, answers /health and
/health/, and can wait before listening, exit after N seconds, ignore SIGTERM, or start a child of its own
(which must die with it: the whole process group is stopped). Every test bounds its waits.
"""
import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pydantic import ValidationError

from posttrain import rollout
from posttrain.rollout import (
    RolloutConfig,
    RolloutServerError,
    VLLMServer,
    free_port,
    grpo_rollout_args,
    resolve_backend,
    vllm_serve_command,
)

STANDIN = r'''
import http.server, os, signal, subprocess, sys, threading, time

port, delay, life = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
flags, pidfile = sys.argv[4], sys.argv[5]
print("stand-in: starting", flush=True)
if "ignore_term" in flags:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "child" in flags:  # a worker in the server's group, as vLLM's engine processes are
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pidfile, "w") as f:
        f.write(str(child.pid))
time.sleep(delay)

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
    server = standin(delay=0.0, life=0.01, health_timeout_s=30)  # crashes as soon as it listens
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


@pytest.mark.parametrize("backend", ["vllm_server", "vllm_colocate"])
def test_vllm_backend_without_vllm_is_a_config_error(monkeypatch, backend):
    monkeypatch.setattr(rollout, "vllm_installed", lambda: False)
    with pytest.raises(ValidationError, match=r"pip install -e \.\[gpu\]"):
        RolloutConfig(backend=backend)
    from posttrain.config import ConfigError, load_pipeline

    import posttrain.stages  # noqa: F401
    with pytest.raises(ConfigError, match=r"stages\[0\]\.rollout.*pip install -e \.\[gpu\]"):
        load_pipeline(None, data={"stages": [{"kind": "grpo", "rollout": {"backend": backend}}]})


def test_server_options_need_the_server_backend():
    with pytest.raises(ValidationError, match="vllm_server only"):
        RolloutConfig(backend="hf", gpus=[1])
    with pytest.raises(ValidationError, match="extra"):
        RolloutConfig(backend="hf", gpu=[1])


def test_backend_mapping_to_grpo_config(monkeypatch):
    import torch

    monkeypatch.setattr(rollout, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend(RolloutConfig()) == "hf"
    assert grpo_rollout_args(RolloutConfig(), "hf") == {"use_vllm": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend(RolloutConfig()) == "vllm_colocate"
    colo = grpo_rollout_args(RolloutConfig(backend="vllm_colocate", tensor_parallel_size=2), "vllm_colocate")
    assert colo == {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
                    "vllm_tensor_parallel_size": 2}
    cfg = RolloutConfig(backend="vllm_server", url="http://10.0.0.5:8000/", health_timeout_s=30)
    assert grpo_rollout_args(cfg, "vllm_server", cfg.url) == {
        "use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://10.0.0.5:8000",
        "vllm_server_timeout": 30}
    from trl import GRPOConfig

    GRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[], **grpo_rollout_args(cfg, "vllm_server", cfg.url))


def test_server_command_is_trl_vllm_serve(monkeypatch):
    monkeypatch.setattr(rollout, "vllm_installed", lambda: True)
    cfg = RolloutConfig(backend="vllm_server", gpus=[1, 2], tensor_parallel_size=2, server_args=["--max-num-seqs", "64"])
    cmd = vllm_serve_command("/models/x", cfg, 8123)
    assert Path(cmd[0]).name == "trl" and cmd[1] == "vllm-serve"
    args = dict(zip(cmd[2:-2:2], cmd[3:-2:2]))
    assert args == {"--model": "/models/x", "--host": "127.0.0.1", "--port": "8123", "--tensor-parallel-size": "2",
                    "--gpu-memory-utilization": "0.9"}  # a server on GPUs of its own takes most of their memory
    assert cmd[-2:] == ["--max-num-seqs", "64"]
    # The arguments are ones TRL's own parser for `trl vllm-serve` accepts.
    from trl.scripts.vllm_serve import make_parser

    parsed, extra = make_parser().parse_args_and_config(args=cmd[2:], return_remaining_strings=True)
    assert (parsed.model, parsed.port, parsed.tensor_parallel_size, parsed.host) == ("/models/x", 8123, 2, "127.0.0.1")
    assert extra == ["--max-num-seqs", "64"]  # not TRL's: forwarded to `vllm serve` as-is
