"""Where GRPO's completions come from: transformers' `generate` in the trainer, or vLLM (server or colocated).

Backends, as TRL's GRPOTrainer names them (`use_vllm`, `vllm_mode`):
  hf              `model.generate` inside the trainer: CPU or GPU, no extra install, slow
  vllm_colocate   vLLM in the trainer's process, sharing its GPUs (`gpu_memory_utilization` of each)
  vllm_server     vLLM in a server process of its own: the one at `url`, or one this module starts on
                  `gpus` with the `vllm serve` command TRL builds for server mode, and stops when the stage ends
  auto            vllm_colocate when CUDA is there and vllm imports, else hf

vLLM is never imported here (it is a GPU-only extra): a vLLM backend without it installed fails when the
config is read, before any model loads. So do setups TRL or NCCL would refuse only once training starts: a
started server with no `gpus` of its own (it would land on the trainer's GPU, and TRL's NCCL weight sync
refuses two ranks on one device), fewer `gpus` than `tensor_parallel_size`, and a colocated
`tensor_parallel_size` that does not divide the number of training processes (TRL's "must divide world size").

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
from typing import Annotated, Any, Callable, Literal

from pydantic import Field, model_validator

from posttrain.schema import ConfigError, Strict

GPU_INSTALL = "pip install -e .[gpu]"
# Set by the CLI while it reads a config it is about to relaunch under `accelerate launch`, where WORLD_SIZE is
# not set yet: the number of processes the launch will start (see `training_processes`).
PLANNED_PROCESSES_ENV = "POSTTRAIN_PLANNED_PROCESSES"


def vllm_installed() -> bool:
    """True when vllm can be imported (looked up, not imported: importing it costs seconds and a GPU probe)."""
    return importlib.util.find_spec("vllm") is not None


def training_processes(local: bool = False) -> int:
    """How many processes train: WORLD_SIZE (with `local`, LOCAL_WORLD_SIZE: those on this machine) as torchrun
    and `accelerate launch` set them, else the planned launch's count (PLANNED_PROCESSES_ENV), else 1."""
    env = os.environ
    return int(env.get("LOCAL_WORLD_SIZE" if local else "WORLD_SIZE") or env.get(PLANNED_PROCESSES_ENV) or 1)


class RolloutConfig(Strict):
    """How GRPO generates its completions (see the module docstring for the backends)."""

    backend: Literal["auto", "hf", "vllm_server", "vllm_colocate"] = "auto"
    url: str | None = Field(None, description="vllm_server: an external server (http://host:port); none is started")
    gpus: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="vllm_server: GPUs of the started server, as indices into the devices "
                                          "this process sees (CUDA_VISIBLE_DEVICES); not the training processes' "
                                          "own (0 .. processes-1). Needed unless url is set")
    port: int = Field(0, ge=0, le=65535, description="vllm_server: port of the started server (0: a free one)")
    group_port: int = Field(0, ge=0, le=65535, description="vllm_server: port of TRL's NCCL weight-sync group on "
                                                           "the training machine (0: a free one)")
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
        if self.backend != "vllm_server" and (self.url or self.gpus or self.server_args or self.group_port):
            raise ValueError("rollout.url, gpus, group_port and server_args apply to backend: vllm_server only")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"rollout.url must start with http:// or https://, got {self.url!r}")
        if self.url and (self.gpus or self.port or self.server_args):
            raise ValueError("rollout.url names a running server, so none is started: rollout.gpus, port and "
                             "server_args (which place and start one) do not apply; drop them or the url")
        if self.backend == "vllm_server" and not self.url:
            _check_server_gpus(self.gpus, self.tensor_parallel_size)
        if self.backend in ("vllm_colocate", "auto") and self.tensor_parallel_size > 1:
            n = training_processes()
            if n % self.tensor_parallel_size:  # TRL checks this when the trainer starts, after the model loaded
                raise ValueError(
                    f"rollout.tensor_parallel_size {self.tensor_parallel_size} with rollout.backend {self.backend}: "
                    f"each colocated vLLM engine spans that many training processes, and this run has {n}; launch "
                    f"a multiple of {self.tensor_parallel_size} (--launcher accelerate --num-processes N) or use "
                    "backend: vllm_server")
        return self


def _check_server_gpus(gpus: list[int], tensor_parallel_size: int) -> None:
    """A server the stage starts needs GPUs of its own: TRL's NCCL weight sync adds the trainer's main process
    to the server's ranks, and NCCL refuses two ranks on one device. Training process k uses visible device k."""
    if not gpus:
        raise ValueError("rollout.gpus: backend vllm_server starts a vLLM server, which needs GPUs apart from "
                         "training's (the training process uses GPU 0): set rollout.gpus (e.g. [1]) or rollout.url "
                         "of a running server; on one GPU use backend: vllm_colocate")
    repeated = sorted({g for g in gpus if gpus.count(g) > 1})
    if repeated:
        raise ValueError(f"rollout.gpus: GPU {repeated[0]} is listed twice")
    if len(gpus) < tensor_parallel_size:
        raise ValueError(f"rollout.gpus: {len(gpus)} GPU(s) for rollout.tensor_parallel_size "
                         f"{tensor_parallel_size}; list at least {tensor_parallel_size}")
    local = training_processes(local=True)
    taken = [g for g in gpus if g < local]
    if taken:
        raise ValueError(f"rollout.gpus: GPU {taken[0]} is a training process's (the {local} training process(es) "
                         f"on this machine use GPUs 0-{local - 1}); NCCL's weight sync refuses the server on it: "
                         f"use GPUs from {local} up")


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


def grpo_rollout_args(cfg: RolloutConfig, backend: str, base_url: str | None = None,
                      group_port: int | None = None) -> dict[str, Any]:
    """GRPOConfig fields for `backend`; `base_url` is the server to use in vllm_server mode, `group_port` the
    port of its NCCL weight-sync group (TRL's fixed default, 51216, would collide between runs on one host)."""
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
                "vllm_server_timeout": cfg.health_timeout_s,
                **({"vllm_group_port": group_port} if group_port else {})}
    raise ValueError(f"unknown rollout backend {backend!r}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now at `host` ("" for every interface: the NCCL group's store listens on
    the machine's address); another process could take it before the server does (rare)."""
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


def server_env(gpus: list[int]) -> dict[str, str]:
    """The started server's environment: SERVER_ENV and CUDA_VISIBLE_DEVICES naming `gpus`, which index the
    devices this process sees: under CUDA_VISIBLE_DEVICES=4,5,6,7, gpus [3] is device 7. ConfigError for an index
    past them (before any model loads: the stage calls this first)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        where = f"CUDA_VISIBLE_DEVICES={visible}"
    else:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]  # counts without starting CUDA
        where = "no CUDA_VISIBLE_DEVICES"
    past = [g for g in gpus if g >= len(devices)]
    if past:
        raise ConfigError(f"rollout.gpus: GPU {past[0]} is past the {len(devices)} GPU(s) this process sees "
                          f"({where}); gpus index those")
    return {**SERVER_ENV, "CUDA_VISIBLE_DEVICES": ",".join(devices[g] for g in gpus)}


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
