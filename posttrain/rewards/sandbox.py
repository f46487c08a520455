"""Run untrusted reward code (model output, sandboxed user rewards) in a separate, limited process.

Why a fresh ``python -I -c`` subprocess rather than ``multiprocessing`` with spawn: spawn copies the parent's
``os.environ`` (so ``OPENAI_API_KEY`` would be visible), re-imports the parent's ``__main__`` and modules
(torch, the trainer), and cannot start the child in a session of its own, so a fork bomb could not be killed
as one group. ``subprocess`` gives an explicit environment, ``-I`` (no ``PYTHON*`` variables, no user
site-packages, no cwd on ``sys.path``), ``start_new_session`` and ``close_fds``, all without ``preexec_fn``,
which is unsafe in a multi-threaded parent such as a trainer.

The child program (``child.py``) is a supervisor that drops to ``nobody`` when we are root, enters user, pid,
mount and network namespaces where the kernel allows (``namespace.py``), and forks the worker, which confines
itself (``confine.py``: private tmpfs scratch, Landlock, seccomp, resource limits) before the untrusted code
runs; code_exec's tests run in a process of their own (``harness.py``). This side adds the memory cgroup of the
call (``cgroup.py``), sends the job, enforces a last deadline, and classifies the outcome. Linux only
(``/proc``, ``pidfd_open``).

Where a part is unavailable (no namespaces: Docker's default seccomp profile; no cgroup: a user without
delegation; no Landlock: kernels before 5.13), the sandbox runs without it and says once what that leaves open.
Without a cgroup the memory of all the call's processes is still bounded: at most ``_PROCS_WITHOUT_CGROUP``
processes for the code, each with an equal share of ``memory_mb``.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import secrets
import select
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from posttrain.rewards import child, confine, harness, namespace
from posttrain.rewards.cgroup import Cgroup
from posttrain.rewards.imports import read_source, sibling_imports

log = logging.getLogger(__name__)

TIMEOUT, MEMORY, CRASH, FORK_LIMIT, EXCEPTION = "timeout", "memory", "crash", "fork_limit", "exception"
NON_FINITE = "non_finite"  # a reward's value, not a sandbox outcome: counted by RewardFunc
ERROR_KINDS = (TIMEOUT, MEMORY, CRASH, FORK_LIMIT, EXCEPTION, NON_FINITE)

NOBODY = 65534  # uid and gid of `nobody`/`nogroup` on Debian-like systems
_FSIZE_BYTES = 64 << 20  # largest file the child may write
_MAX_RESULT_BYTES = 8 << 20  # more than this on the result pipe is not a result
_EXIT_NO_DROP = 70  # the child could not become `nobody`; it ran nothing
_CGROUP_OVERHEAD_MB = 64  # the supervisor, the namespace's init and code_exec's tester, on top of memory_mb
_PROCS_WITHOUT_CGROUP = 2  # processes (and threads) the code may have when no cgroup bounds their sum
_MIN_AS_MB = 64  # below this address space a Python process cannot start
# Try namespaces and cgroups until one run finds they do not work here (then stay without, in this process).
_use_namespaces = True
_use_cgroups = True
_GRACE_S = 3.0  # interpreter start-up and reaping, on top of timeout_s, before we kill the supervisor
_CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    # Threads count against RLIMIT_NPROC: BLAS/OpenMP would start one per core and fail on a big machine.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class FileFunction:
    """A function named ``name`` defined at the top level of the Python file ``path``."""

    path: str
    name: str


@dataclass(frozen=True)
class Tests:
    """code_exec's job: ``code`` (a completion) checked by ``tests`` (Python, typically asserts), each in a
    process of its own (``harness.py``); the value is True when the tests ran to the end, False on an assert."""

    code: str
    tests: str


CHILD = (child.CHILD.replace("__NAMESPACE__", namespace.CHILD_CODE).replace("__CONFINE__", confine.CHILD_CODE)
         .replace("__HARNESS__", harness.CHILD_CODE).replace("__NO_DROP__", str(_EXIT_NO_DROP))
         .replace("__MAX_RESULT__", str(_MAX_RESULT_BYTES)))


def _job(fn_or_code: Any, args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the child should run: code chunks, tests of a completion, or a function in a file (a callable is
    found by its file)."""
    if isinstance(fn_or_code, Tests):
        return {"mode": "tests", "code": [fn_or_code.code], "tests": fn_or_code.tests}
    if isinstance(fn_or_code, str):
        return {"mode": "code", "code": [fn_or_code]}
    if isinstance(fn_or_code, (list, tuple)) and all(isinstance(c, str) for c in fn_or_code):
        return {"mode": "code", "code": list(fn_or_code)}
    if callable(fn_or_code) and not isinstance(fn_or_code, FileFunction):
        fn_or_code = FileFunction(inspect.getsourcefile(fn_or_code) or "", fn_or_code.__name__)
    if not isinstance(fn_or_code, FileFunction):
        raise TypeError(f"cannot sandbox {type(fn_or_code).__name__}; pass code or a module-level function")
    path = os.path.abspath(fn_or_code.path)
    modules = {name: [read_source(file), file] for name, file in sibling_imports(path).items()}
    return {"mode": "call", "path": path, "func": fn_or_code.name, "modules": modules, "args": list(args),
            "kwargs": dict(kwargs or {})}


def run_sandboxed(
    fn_or_code: str | Sequence[str] | Tests | Callable[..., Any] | FileFunction,
    args: Sequence[Any] = (),
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    cpu_s: float | None = None,
    max_procs: int = 16,
    kwargs: Mapping[str, Any] | None = None,
) -> tuple[Any, str | None]:
    """Run code or a function in a limited child process; return ``(value, None)`` or ``(None, error_kind)``.

    ``fn_or_code`` is Python source (``str``), or a list of sources run in order in one namespace (module
    ``__sandbox__``, so ``if __name__ == "__main__"`` blocks are skipped, as in HumanEval-style harnesses;
    value ``True`` when all ran, ``False`` when an ``AssertionError`` stopped them), or ``Tests`` (code_exec:
    the same value, decided where the code cannot reach), or a module-level function / ``FileFunction``, whose
    file the child loads by path and calls with ``*args, **kwargs`` (JSON values in and out); the modules next
    to the file that it imports (``sibling_imports``) are read here and found there first, as a script's folder
    is, and nothing of the parent's ``sys.path`` is added. ``memory_mb`` bounds the sum over the call's
    processes (a cgroup; without one, each of at most ``_PROCS_WITHOUT_CGROUP`` gets a share), and a scratch
    tmpfs of half as much holds ``/tmp``, ``/var/tmp`` and ``/dev/shm``. ``cpu_s`` defaults to ``timeout_s``;
    ``max_procs`` counts every process and thread of the sandbox user, the supervisor (and the namespace's init,
    and code_exec's tester) included. Error kinds are those in ``ERROR_KINDS``; this function never raises for
    anything the child does.
    """
    try:
        job = _job(fn_or_code, args, kwargs)
        json.dumps(job)  # fail here, in the parent, on arguments that are not JSON
    except (TypeError, ValueError, OSError) as e:
        log.warning("sandbox: cannot send the job to the child: %s", e)
        return None, EXCEPTION
    cpu = max(1, math.ceil(timeout_s if cpu_s is None else cpu_s))
    sizes = {"memory_mb": memory_mb, "cpu_s": cpu, "max_procs": max_procs}
    try:
        run = _run(job, timeout_s, sizes, _use_namespaces)
        if run.report is not None and "no_namespace" in run.report:  # nothing ran: once more, without
            reason = run.report["no_namespace"]
            _namespaces_unavailable()
            run = _run(job, timeout_s, sizes, False)
            landlock = bool((_json((run.report or {}).get("confined")) or {}).get("landlock"))
            namespace.log_unavailable(reason, NOBODY if os.geteuid() == 0 else None, landlock)
    except OSError as e:  # the machinery itself failed (no fork, no temp dir): say so, but do not raise
        log.warning("sandbox: could not run the child: %s", e)
        return None, EXCEPTION
    if run.overran:
        return None, TIMEOUT
    if run.report is None:
        return None, MEMORY if run.oom else EXCEPTION
    confine.say_what_is_missing(_json(run.report.get("confined")), run.limits, run.namespace)
    return _classify(run, job["mode"])


def _namespaces_unavailable() -> None:
    """Remember for this process that namespaces fail here (no second try per call)."""
    global _use_namespaces
    _use_namespaces = False


@dataclass
class _Run:
    """One start of the child: its report (None if it gave none), what it was given, how it ended."""

    report: dict[str, Any] | None
    nonce: str
    limits: dict[str, Any]
    namespace: bool
    overran: bool = False
    oom: bool = False


def _limits(sizes: dict[str, int], group: Cgroup | None, namespace_: bool, mode: str) -> dict[str, Any]:
    """The worker's rlimits: with a cgroup (which bounds the sum), ``memory_mb`` each; without one, a few
    processes that share ``memory_mb``, since RLIMIT_AS binds one process and forks each get it whole."""
    memory_mb, max_procs = sizes["memory_mb"], sizes["max_procs"]
    common = {"cpu_s": sizes["cpu_s"], "fsize": _FSIZE_BYTES, "cgroup": group is not None}
    if group is not None:
        return dict(common, nproc=max_procs, as_bytes=memory_mb << 20)
    own = 1 + int(namespace_) + int(mode == "tests")  # supervisor, the namespace's init, code_exec's tester
    procs = max(1, min(max_procs - own, _PROCS_WITHOUT_CGROUP))
    return dict(common, nproc=own + procs, as_bytes=max(memory_mb // procs, _MIN_AS_MB) << 20)


def _run(job: dict[str, Any], timeout_s: float, sizes: dict[str, int], namespace_: bool) -> _Run:
    """Start the supervisor in its cgroup, hand it the job, wait for its report."""
    import subprocess

    uid = NOBODY if os.geteuid() == 0 else None
    nonce, tag = secrets.token_hex(16), secrets.token_hex(8)
    workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    group = Cgroup.create((sizes["memory_mb"] + _CGROUP_OVERHEAD_MB) << 20, sizes["max_procs"]) if _use_cgroups \
        else None
    rfd, wfd = os.pipe()
    proc, clean, run = None, False, None
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        env = dict(_CHILD_ENV, POSTTRAIN_SANDBOX=tag)  # the tag finds strays if the supervisor is killed
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd=workdir, env=env, start_new_session=True, close_fds=True,
            pass_fds=(wfd,),
        )
        child_fd, wfd = wfd, -1  # pass_fds keeps its number in the child
        os.close(child_fd)
        if group is not None and not group.add(proc.pid):  # it waits for its job: nothing ran outside the group
            group.remove()
            group = None
        limits = _limits(sizes, group, namespace_, job["mode"])
        run = _Run(None, nonce, limits, namespace_)
        header = {k: v for k, v in job.items() if k != "tests"}  # the tests follow, apart (see child.py)
        header.update(nonce=None if job["mode"] == "tests" else nonce, result_fd=child_fd, uid=uid, limits=limits, timeout_s=timeout_s,
                      namespace=namespace_, scratch_mb=max(sizes["memory_mb"] // 2, 16))
        payload = json.dumps(header).encode()
        tests = json.dumps(job["tests"]).encode() if job["mode"] == "tests" else b""
        _send(proc, b"%010d" % len(payload) + payload + tests)
        # The supervisor enforces timeout_s on the worker; this later deadline only catches a stuck supervisor.
        data, run.overran = _wait(proc.pid, rfd, time.monotonic() + timeout_s + _GRACE_S)
        _kill_group(proc.pid)  # the supervisor is a zombie at worst, so its group id cannot be reused yet
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        run.report = None if run.overran else _parse_report(data, proc.returncode)
        clean = run.report is not None
        return run
    finally:
        if proc is not None and proc.returncode is None:  # interrupted (e.g. KeyboardInterrupt)
            _kill_group(proc.pid)
            proc.wait()
        if not clean and proc is not None:
            _kill_strays(tag)
        if group is not None:
            if run is not None:
                run.oom = group.oom_killed()
            group.remove()
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _send(proc: Any, payload: bytes) -> None:
    """Write the job to the child's stdin; a child that died first shows up in its report, not here."""
    try:
        proc.stdin.write(payload)
        proc.stdin.close()
    except OSError:
        pass


def _wait(pid: int, rfd: int, deadline: float) -> tuple[bytes, bool]:
    """Collect bytes from ``rfd`` until process ``pid`` exits or the deadline passes: (bytes, overran)."""
    pidfd = os.pidfd_open(pid)  # readable once the child exits; unlike waitpid, it leaves the zombie in place
    chunks, size, watch = [], 0, [rfd, pidfd]
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(chunks), True
            ready, _, _ = select.select(watch, [], [], left)
            if rfd in ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    watch.remove(rfd)  # every writer closed; keep waiting for the exit only
                elif size < 2 * _MAX_RESULT_BYTES:
                    chunks.append(chunk)
                    size += len(chunk)
            if pidfd in ready:
                return b"".join(chunks) + _drain(rfd), False
    finally:
        os.close(pidfd)


def _drain(rfd: int) -> bytes:
    """Whatever the child wrote just before it exited; never blocks."""
    os.set_blocking(rfd, False)
    chunks = []
    try:
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks)


def _parse_report(data: bytes, returncode: int) -> dict[str, Any] | None:
    """The supervisor's report, or None (logged: the machinery failed, not the reward code)."""
    try:
        report = json.loads(data)
        if isinstance(report, dict) and ({"status", "timed_out", "result"} <= report.keys()
                                         or isinstance(report.get("no_namespace"), str)):
            return report
    except ValueError:
        pass
    if returncode == _EXIT_NO_DROP:
        log.error("sandbox: the child could not drop privileges to uid %d; nothing was run", NOBODY)
    else:
        log.warning("sandbox: the supervisor exited with %s and no report", returncode)
    return None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_strays(tag: str) -> None:
    """Kill processes that carry the child's env tag; used only when the supervisor could not reap them."""
    needle = f"POSTTRAIN_SANDBOX={tag}".encode()
    for _ in range(5):  # a stray may fork while we look; RLIMIT_NPROC bounds how often
        found = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle not in f.read().split(b"\0"):
                        continue
                os.kill(int(entry), signal.SIGKILL)
                found += 1
            except OSError:  # gone already, or not ours to read
                continue
        if not found:
            return


def _classify(run: _Run, mode: str) -> tuple[Any, str | None]:
    """Turn the supervisor's report into ``(value, None)`` or ``(None, error_kind)``."""
    report = run.report
    assert report is not None
    if report["timed_out"]:
        return None, TIMEOUT
    if mode == "tests":  # the tester's verdict; when the completion's process failed, its own report says how
        verdict = _json(report.get("tester"))
        if isinstance(verdict, dict) and verdict.get("error") is None and isinstance(verdict.get("value"), bool):
            return verdict["value"], None
        if isinstance(verdict, dict) and verdict.get("error") in ERROR_KINDS:
            return None, verdict["error"]
        claim = _json(report["result"])  # the completion's process: trusted for the kind of error only
        if isinstance(claim, dict) and claim.get("error") in ERROR_KINDS:
            return None, claim["error"]
        if not report.get("exited_first") and not run.oom:  # alive, but it broke the harness's protocol
            return None, EXCEPTION
    else:
        msg = _json(report["result"])
        if isinstance(msg, dict) and msg.get("nonce") == run.nonce:  # only our bootstrap knows the nonce
            if msg.get("error") is None:
                return msg.get("value"), None
            log.debug("sandbox: %s: %s", msg["error"], msg.get("detail"))
            return None, msg["error"] if msg["error"] in ERROR_KINDS else EXCEPTION
    return None, _by_status(report, run)


def _json(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) and text else None
    except ValueError:
        return None


def _by_status(report: dict[str, Any], run: _Run) -> str:
    """The error kind of a worker that gave no genuine result, from how it ended."""
    code = os.waitstatus_to_exitcode(report["status"])
    if code >= 0 and not run.oom:  # exited without a genuine result, e.g. os._exit(0) before the tests ran
        return EXCEPTION
    sig = -code
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and report.get("cpu_s", 0) >= run.limits["cpu_s"]):
        return TIMEOUT
    # Killed near the memory limit: the cgroup's OOM killer, or a C allocation that failed under RLIMIT_AS
    # (abort, NULL dereference). Resident memory stays below the address-space limit, hence half-way.
    if run.oom or report.get("maxrss_kb", 0) * 1024 >= run.limits["as_bytes"] // 2:
        return MEMORY
    return CRASH
