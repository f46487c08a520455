"""Where GRPO's completions come from: transformers' `generate` in the trainer, or vLLM (server or colocated).

Backends, as TRL's GRPOTrainer names them (`use_vllm`, `vllm_mode`):
  hf              `model.generate` inside the trainer: CPU or GPU, no extra install, slow
  vllm_colocate   vLLM in the trainer's process, sharing its GPUs (`gpu_memory_utilization` of each)
  vllm_server     vLLM in a server process of its own: the one at `url`, or one this module starts on
                  `gpus` with the `vllm serve` command TRL builds for server mode, and stops when the stage ends
  auto            vllm_colocate when CUDA is there and vllm imports, else hf

vLLM is never imported here (it is a GPU-only extra): a vLLM backend without it installed fails when the
config is read, before any model loads.

`VLLMServer` owns a started server: its own process group (so vLLM's engine workers go with it), its log in
the stage folder, a health wait with a timeout, a watcher thread that notices an early exit, and a stop
(SIGTERM, then SIGKILL on the whole group) however the `with` block ends, Ctrl-C included.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from posttrain.config import Strict

GPU_INSTALL = "pip install -e .[gpu]"


def vllm_installed() -> bool:
    """True when vllm can be imported (looked up, not imported: importing it costs seconds and a GPU probe)."""
    return importlib.util.find_spec("vllm") is not None


class RolloutConfig(Strict):
    """How GRPO generates its completions (see the module docstring for the backends)."""

    backend: Literal["auto", "hf", "vllm_server", "vllm_colocate"] = "auto"
    url: str | None = Field(None, description="vllm_server: an external server (http://host:port); none is started")
    gpus: list[int] = Field(default_factory=list, description="vllm_server: CUDA devices of the started server "
                                                              "(empty: the devices this process sees)")
    port: int = Field(0, ge=0, le=65535, description="vllm_server: port of the started server (0: a free one)")
    health_timeout_s: float = Field(600.0, gt=0, description="vllm_server: how long the server may take to start")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM's share of each of its GPUs' memory (None: 0.9 for a server on gpus of "
                                      "its own, else 0.3, leaving the rest to training)")
    tensor_parallel_size: int = Field(1, ge=1)
    server_args: list[str] = Field(default_factory=list, description="more arguments for `vllm serve`, as-is")

    @model_validator(mode="after")
    def _check(self) -> "RolloutConfig":
        # Also with an external `url`: TRL's client pushes weights to the server through vllm's communicator.
        if self.backend in ("vllm_server", "vllm_colocate") and not vllm_installed():
            raise ValueError(f"rollout.backend {self.backend!r} needs vllm, which is not installed; "
                             f"`{GPU_INSTALL}` on a GPU machine (or use backend: hf)")
        if self.backend != "vllm_server" and (self.url or self.gpus or self.server_args):
            raise ValueError("rollout.url, gpus and server_args apply to backend: vllm_server only")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"rollout.url must start with http:// or https://, got {self.url!r}")
        return self


def resolve_backend(cfg: RolloutConfig) -> str:
    """The concrete backend: `auto` becomes vllm_colocate with CUDA and vllm, else hf."""
    if cfg.backend != "auto":
        return cfg.backend
    import torch

    return "vllm_colocate" if torch.cuda.is_available() and vllm_installed() else "hf"


def memory_utilization(cfg: RolloutConfig) -> float:
    """vLLM's GPU memory share: as set, else 0.9 on GPUs it has to itself, 0.3 on GPUs shared with training."""
    if cfg.gpu_memory_utilization is not None:
        return cfg.gpu_memory_utilization
    return 0.9 if cfg.backend == "vllm_server" and cfg.gpus else 0.3


def grpo_rollout_args(cfg: RolloutConfig, backend: str, base_url: str | None = None) -> dict[str, Any]:
    """GRPOConfig fields for `backend`; `base_url` is the server to use in vllm_server mode."""
    if backend == "hf":
        return {"use_vllm": False}
    if backend == "vllm_colocate":
        return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": memory_utilization(cfg),
                "vllm_tensor_parallel_size": cfg.tensor_parallel_size}
    if backend == "vllm_server":
        if not base_url:
            raise ValueError("vllm_server needs the server's URL")
        # TRL's client waits vllm_server_timeout for /health; ours has already waited when we started the server.
        return {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": base_url.rstrip("/"),
                "vllm_server_timeout": cfg.health_timeout_s}
    raise ValueError(f"unknown rollout backend {backend!r}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process could take it before the server does; rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# TRL 1.16 deprecated `trl vllm-serve`: it now only execs `vllm serve` with the flags its client needs (NCCL weight
# transfer, processed logprobs, unlimited logprobs) and VLLM_SERVER_DEV_MODE=1, and tells users to run that command.
# We build it with TRL's own `build_command`, so the flags stay the ones the installed TRL's client expects.
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # the weight-transfer endpoints TRL's client calls live behind dev mode


def vllm_serve_command(model: str, cfg: RolloutConfig, port: int, trust_remote_code: bool = False) -> list[str]:
    """`vllm serve` as TRL 1.x runs it for server mode (trl.scripts.vllm_serve.build_command), bound to loopback
    (the trainer is on this machine), plus `server_args` as-is. Run it with SERVER_ENV in its environment."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    args = ScriptArguments(model=model, host="127.0.0.1", port=port, tensor_parallel_size=cfg.tensor_parallel_size,
                           gpu_memory_utilization=memory_utilization(cfg), trust_remote_code=trust_remote_code)
    return build_command(args, list(cfg.server_args))


class RolloutServerError(RuntimeError):
    """The generation server did not come up, or died; the message carries its last log lines."""


def tail(path: Path, lines: int = 20, max_bytes: int = 16384) -> str:
    """The last `lines` lines of a log file (reads at most `max_bytes` from its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(deque(text.splitlines(), maxlen=lines)) or "(empty log)"


class VLLMServer:
    """Run `command` as a server on 127.0.0.1:`port` for the length of a `with` block.

    On enter: start it in a new process group with its output in `log_path`, then poll
    `GET http://127.0.0.1:<port>/health` until it answers 200 (RolloutServerError after `health_timeout_s`,
    or as soon as the process exits). While inside: a watcher thread notes an exit; `check()` (called from
    a TrainerCallback after every step) raises it; an exception leaving the block while the server is dead
    becomes RolloutServerError with the log's last lines. On exit, however reached: SIGTERM to the group,
    SIGKILL to the group after `stop_timeout_s`, and the process reaped.

    The health path is `/health`, which `vllm serve` answers and TRL's client polls (a stand-in server may
    answer `/health/` too).
    """

    def __init__(self, command: list[str], port: int, log_path: Path, *, env: dict[str, str] | None = None,
                 health_timeout_s: float = 600.0, stop_timeout_s: float = 10.0, poll_s: float = 0.5,
                 log: Callable[[str], None] = print):
        self.command, self.port, self.log_path = list(command), port, Path(log_path)
        self.env, self.health_timeout_s, self.stop_timeout_s, self.poll_s = env, health_timeout_s, stop_timeout_s, poll_s
        self.log = log
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._died = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> "VLLMServer":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        died = self.proc is not None and self.proc.poll() is not None and not self._stopping.is_set()
        code = self.proc.returncode if self.proc else None
        self.stop()
        # Ctrl-C stays an interrupt: the server runs in its own session, so it never receives the SIGINT.
        if exc_type is not None and died and not issubclass(exc_type, (RolloutServerError, KeyboardInterrupt)):
            raise RolloutServerError(self._died_message(code)) from exc
        return False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"rollout: starting {' '.join(self.command)} (log: {self.log_path})")
        with open(self.log_path, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})}, start_new_session=True,
            )
        try:
            self._wait_healthy()
        except BaseException:  # timeout, early exit, Ctrl-C while waiting: leave nothing behind
            self.stop()
            raise
        self._watcher = threading.Thread(target=self._watch, name="vllm-server-watcher", daemon=True)
        self._watcher.start()
        self.log(f"rollout: server healthy at {self.base_url}")

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        start = time.monotonic()
        deadline = start + self.health_timeout_s
        url = f"{self.base_url}/health"
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RolloutServerError(f"the rollout server exited with code {code} before it became healthy "
                                         f"({self.log_path}); last log lines:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(url, timeout=max(0.1, min(5.0, deadline - time.monotonic()))) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise RolloutServerError(
                    f"the rollout server did not answer {url} within {self.health_timeout_s:g}s "
                    f"(rollout.health_timeout_s); last lines of {self.log_path}:\n{tail(self.log_path)}")
            time.sleep(self.poll_s)

    def _watch(self) -> None:
        assert self.proc is not None
        while not self._stopping.is_set():
            if self.proc.poll() is not None:
                if not self._stopping.is_set():
                    self._died.set()
                    self.log(f"rollout: the server exited with code {self.proc.returncode} during training; "
                             f"the stage fails at its next step (log: {self.log_path})")
                return
            self._stopping.wait(self.poll_s)

    def _died_message(self, code: int | None) -> str:
        return (f"the rollout server exited with code {code} during training ({self.log_path}); "
                f"last log lines:\n{tail(self.log_path)}")

    def check(self) -> None:
        """Raise RolloutServerError if the server has exited (and we did not stop it)."""
        if self.proc is not None and not self._stopping.is_set() and self.proc.poll() is not None:
            self._died.set()
            raise RolloutServerError(self._died_message(self.proc.returncode))

    def stop(self) -> None:
        """SIGTERM the group, wait, SIGKILL whatever of the group is left, reap. Safe to call twice."""
        self._stopping.set()
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the server leads a group whose id is its pid
        if proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.log(f"rollout: server did not stop in {self.stop_timeout_s:g}s after SIGTERM; killing it")
            except KeyboardInterrupt:  # a second Ctrl-C while waiting: kill at once, below
                pass
        # Also after a clean exit of the leader: vLLM's engine and tensor-parallel workers share its group.
        _signal_group(pgid, signal.SIGKILL)
        proc.wait()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def server_callback(server: VLLMServer):
    """A TrainerCallback that fails the stage at the end of a step if the rollout server has died."""
    from transformers import TrainerCallback

    class _ServerAlive(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            server.check()

        def on_step_end(self, args, state, control, **kw):
            server.check()

    return _ServerAlive()
