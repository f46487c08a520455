"""Run untrusted reward code (model output, sandboxed user rewards) in a separate, limited process.

Why a fresh ``python -I -c`` subprocess rather than ``multiprocessing`` with spawn: spawn copies the parent's
``os.environ`` (so ``OPENAI_API_KEY`` would be visible), re-imports the parent's ``__main__`` and modules
(torch, the trainer), and cannot start the child in a session of its own, so a fork bomb could not be killed
as one group. ``subprocess`` gives an explicit environment, ``-I`` (no ``PYTHON*`` variables, no user
site-packages, no cwd on ``sys.path``), ``start_new_session`` and ``close_fds``, all without ``preexec_fn``,
which is unsafe in a multi-threaded parent such as a trainer.

The child (``_CHILD``) is two processes. The supervisor reads the job from stdin while still root, drops to
``nobody`` (uid/gid 65534) when the parent is root (RLIMIT_NPROC does not bind root), becomes the subreaper
of what it starts, and forks the worker. The worker leads its own process group, sets RLIMIT_NPROC,
RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE and RLIMIT_CORE, then runs the untrusted code in an empty temporary
directory (removed afterwards). At the deadline, or when the worker exits, the supervisor kills the worker's
group plus any process that left it, reaps them all (no zombies left to count against RLIMIT_NPROC), and
reports back as JSON over a pipe the worker cannot write. The worker's result carries a nonce that is never
handed to the untrusted code, so ``os._exit(0)`` or a forged line on stdout does not fake a pass (code that
digs the nonce out of the interpreter's frames could). Linux only (``/proc``, ``pidfd_open``).

Where the kernel allows unprivileged user namespaces, the supervisor also puts the worker in new user, pid
and mount namespaces with a fresh ``/proc`` (``namespace.py``), so the code cannot read the trainer's
``/proc/<pid>/environ``, which matters without root, when the worker keeps the trainer's uid, and in a
network namespace of its own (no network at all), where the kernel allows that too. Where it does
not (Docker's default seccomp profile, a masked ``/proc``), the sandbox runs without them, warning once.
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

from posttrain.rewards.imports import read_source, sibling_imports
from posttrain.rewards.namespace import CHILD_CODE, log_unavailable

log = logging.getLogger(__name__)

TIMEOUT, MEMORY, CRASH, FORK_LIMIT, EXCEPTION = "timeout", "memory", "crash", "fork_limit", "exception"
ERROR_KINDS = (TIMEOUT, MEMORY, CRASH, FORK_LIMIT, EXCEPTION)

NOBODY = 65534  # uid and gid of `nobody`/`nogroup` on Debian-like systems
_FSIZE_BYTES = 64 << 20  # largest file the child may write (its scratch dir lives on a shared disk)
_MAX_RESULT_BYTES = 8 << 20  # more than this on the result pipe is not a result
_EXIT_NO_DROP = 70  # the child could not become `nobody`; it ran nothing
# Try user/pid namespaces until one run finds they do not work here (then stay without, in this process).
_use_namespaces = True
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


# The child program. It must not import posttrain: it stays small and quick to start. Two processes:
# the supervisor (trusted: reads the job, drops privileges, enforces the deadline, kills and reaps) and the
# worker it forks, which sets the resource limits, leads its own process group and runs the untrusted code.
_CHILD = r'''
import errno, json, os, resource, select, signal, sys, time

def keep_imports_reachable():
    # As `nobody` we may not traverse the interpreter's prefix (e.g. a pyenv under /root, mode 0700), so
    # later imports (ctypes, numpy) would fail. Directory handles opened now, as root, are reachable
    # through /proc/self/fd/N whatever the permissions above them; they grant nothing outside sys.path.
    moved = {}
    for p in list(sys.path):
        try:
            fd = os.open(p, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            continue
        os.set_inheritable(fd, True)
        moved[p] = "/proc/self/fd/%d" % fd
    def move(path):
        for old, new in moved.items():
            if path == old or path.startswith(old + os.sep):
                return new + path[len(old):]
        return path
    sys.path[:] = [move(p) for p in sys.path]
    for mod in list(sys.modules.values()):  # packages imported at startup (encodings, collections)
        if isinstance(getattr(mod, "__path__", None), list):
            mod.__path__[:] = [move(p) for p in mod.__path__]
    sys.path_importer_cache.clear()

def become(uid):
    keep_imports_reachable()
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # as root this sets real, effective and saved uid: there is no way back
    except OSError:
        os._exit(__NO_DROP__)
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()) != (uid, uid, uid, uid, []):
        os._exit(__NO_DROP__)

def prctl_flags():
    # PR_SET_CHILD_SUBREAPER (36): orphans of the worker's processes come to us, not to init, so we reap
    # them at once (an init that reaps late, or a trainer that is PID 1, would leave zombies that count
    # against RLIMIT_NPROC). PR_SET_NO_NEW_PRIVS (38): no setuid binary can give the worker back root.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)
    libc.prctl(38, 1, 0, 0, 0)

def set_limits(lim):
    # RLIMIT_NPROC counts every process and thread of the real uid, so it is set after the drop.
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
    resource.setrlimit(resource.RLIMIT_AS, (lim["as_bytes"], lim["as_bytes"]))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def kind_of(e):
    if isinstance(e, MemoryError):
        return "memory"
    if isinstance(e, OSError) and e.errno == errno.EAGAIN:  # fork() or clone() over RLIMIT_NPROC
        return "fork_limit"
    if isinstance(e, RuntimeError) and "can't start new thread" in str(e):
        return "fork_limit"
    return "exception"

def run(job, sources):
    compiled = [compile(src, name, "exec") for src, name in sources]  # under the limits: compiling can blow up
    if job["mode"] == "code":
        ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
        try:
            for code in compiled:  # compiled apart, so one chunk cannot swallow the next in a string
                exec(code, ns)
        except AssertionError:  # a failed test: a wrong answer, not an error of the sandboxed code
            return False
        return True
    import types
    sys.meta_path.insert(0, Siblings(job["modules"]))  # first, as a script's folder comes first on sys.path
    mod = types.ModuleType("posttrain_sandboxed_reward")
    mod.__file__ = job["path"]
    sys.modules[mod.__name__] = mod
    exec(compiled[0], mod.__dict__)
    return getattr(mod, job["func"])(*job["args"], **job["kwargs"])

class Siblings:
    # The modules next to the reward file that it imports, read by the trainer (no sys.path entry: the
    # worker may not be allowed to read that folder, and should see nothing else in it).
    def __init__(self, modules):
        self.modules = modules
    def find_spec(self, name, path=None, target=None):
        if path is None and name in self.modules:
            from importlib.machinery import ModuleSpec
            return ModuleSpec(name, self, origin=self.modules[name][1])
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        source, module.__file__ = self.modules[module.__name__]
        exec(compile(source, module.__file__, "exec"), module.__dict__)

def worker(job, sources, wfd):
    os.setpgid(0, 0)
    if job["namespace"]:
        try:
            isolate_worker()
        except Exception as e:  # nothing untrusted ran: tell the supervisor, which tells the parent
            os.write(wfd, ("N%s: %s" % (type(e).__name__, e)).encode()[:500])
            os._exit(0)
    # Written before any untrusted code runs, so the code cannot fake an "N" (and so turn namespaces off).
    os.write(wfd, b"R")
    set_limits(job["limits"])
    me = os.getpid()
    try:
        data = json.dumps({"nonce": job["nonce"], "value": run(job, sources), "error": None}).encode()
    except BaseException as e:
        if os.getpid() != me:
            os._exit(1)  # a forked copy of the untrusted code: only the original process reports
        detail = ("%s: %s" % (type(e).__name__, e))[:500]
        data = json.dumps({"nonce": job["nonce"], "value": None, "error": kind_of(e), "detail": detail}).encode()
    if os.getpid() != me:
        os._exit(0)
    while data:
        data = data[os.write(wfd, data):]
    os._exit(0)

def collect(pid, rfd, deadline):
    pidfd = os.pidfd_open(pid)
    chunks, watch = [], [rfd, pidfd]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), True
        ready = select.select(watch, [], [], left)[0]
        if rfd in ready:
            chunk = os.read(rfd, 65536)
            if not chunk:
                watch.remove(rfd)
            elif sum(map(len, chunks)) < __MAX_RESULT__:
                chunks.append(chunk)
        if pidfd in ready:
            os.set_blocking(rfd, False)
            try:
                while chunk := os.read(rfd, 65536):
                    chunks.append(chunk)
            except BlockingIOError:
                pass
            return b"".join(chunks)[:__MAX_RESULT__], False

def children():
    me = os.getpid()
    try:
        with open("/proc/%d/task/%d/children" % (me, me)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # kernel without CONFIG_PROC_CHILDREN: read every parent pid
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return found

def reap_all(wpid):
    # Kill the worker's group and everything re-parented to us (strays that left the group), until no
    # child is left: as subreaper, we have no descendant once we have no child.
    while True:
        for kill, target in [(os.killpg, wpid)] + [(os.kill, c) for c in children()]:
            try:
                kill(target, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return

def main():
    job = json.loads(sys.stdin.buffer.read())
    out = job.pop("result_fd")
    if job["mode"] == "code":
        sources = [(s, "<sandbox-%d>" % i) for i, s in enumerate(job["code"])]
    else:  # read the user's file while still root: `nobody` may not be allowed to
        with open(job["path"], encoding="utf-8") as f:
            sources = [(f.read(), job["path"])]
    if job["uid"] is not None:
        become(job["uid"])
    prctl_flags()
    if job["namespace"]:
        try:
            enter_namespaces()
        except Exception as e:
            return report_to(out, {"no_namespace": "%s: %s" % (type(e).__name__, e)})
    rfd, wfd = os.pipe()
    deadline = time.monotonic() + job["timeout_s"]
    wpid = os.fork()
    if wpid == 0:
        os.close(out)  # the worker must not be able to write the report
        os.close(rfd)
        worker(job, sources, wfd)
    os.close(wfd)
    try:
        os.setpgid(wpid, wpid)  # also here, so the group exists before we could ever kill it
    except OSError:
        pass
    data, timed_out = collect(wpid, rfd, deadline)
    try:
        os.killpg(wpid, signal.SIGKILL)  # the worker is a zombie at worst, so its group id is still ours
    except OSError:
        pass
    _, status, ru = os.wait4(wpid, 0)
    reap_all(wpid)  # in a pid namespace this kills its init too, and with it every process left there
    report = {"status": status, "timed_out": timed_out, "maxrss_kb": ru.ru_maxrss,
              "cpu_s": ru.ru_utime + ru.ru_stime, "result": data[1:].decode("utf-8", "replace")}
    if data[:1] == b"N":
        report = {"no_namespace": report["result"]}
    report_to(out, report)

def report_to(out, report):
    data = json.dumps(report).encode()
    while data:
        data = data[os.write(out, data):]
    os._exit(0)

__NAMESPACE__
main()
'''.replace("__NAMESPACE__", CHILD_CODE).replace("__NO_DROP__", str(_EXIT_NO_DROP)).replace("__MAX_RESULT__", str(_MAX_RESULT_BYTES))


def _job(fn_or_code: Any, args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the child should run: code chunks, or a function in a file (a callable is found by its file)."""
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
    fn_or_code: str | Sequence[str] | Callable[..., Any] | FileFunction,
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
    value ``True`` when all ran, ``False`` when an ``AssertionError`` stopped them), or a module-level
    function / ``FileFunction``, whose file the child loads by path and calls with ``*args, **kwargs`` (JSON
    values in and out); the modules next to the file that it imports (``sibling_imports``) are read here and
    found there first, as a script's folder is, and nothing of the parent's ``sys.path`` is added. ``cpu_s``
    defaults to ``timeout_s``; ``max_procs`` counts every process and thread of the sandbox user, the
    supervisor (and the namespace's init) included. Error kinds are those in ``ERROR_KINDS``; this function
    never raises for anything the child does.
    """
    try:
        job = _job(fn_or_code, args, kwargs)
        json.dumps(job)  # fail here, in the parent, on arguments that are not JSON
    except (TypeError, ValueError, OSError) as e:
        log.warning("sandbox: cannot send the job to the child: %s", e)
        return None, EXCEPTION
    cpu = max(1, math.ceil(timeout_s if cpu_s is None else cpu_s))
    limits = {"nproc": max_procs, "as_bytes": memory_mb << 20, "cpu_s": cpu, "fsize": _FSIZE_BYTES}
    try:
        report, nonce, overran = _run(job, timeout_s, limits, _use_namespaces)
        if report is not None and "no_namespace" in report:  # nothing ran: once more, without
            _namespaces_unavailable(report["no_namespace"])
            report, nonce, overran = _run(job, timeout_s, limits, False)
    except OSError as e:  # the machinery itself failed (no fork, no temp dir): say so, but do not raise
        log.warning("sandbox: could not run the child: %s", e)
        return None, EXCEPTION
    if overran:
        return None, TIMEOUT
    if report is None:
        return None, EXCEPTION
    return _classify(report, nonce, memory_mb, cpu)


def _namespaces_unavailable(reason: str) -> None:
    """Remember for this process that namespaces fail here (no second try per call); say what it costs."""
    global _use_namespaces
    _use_namespaces = False
    log_unavailable(reason, NOBODY if os.geteuid() == 0 else None)


def _run(job: dict[str, Any], timeout_s: float, limits: dict[str, int],
         namespace: bool) -> tuple[dict[str, Any] | None, str, bool]:
    """Start the supervisor, hand it the job; return its report (None if it gave none), the nonce, overran."""
    import subprocess

    uid = NOBODY if os.geteuid() == 0 else None
    nonce, tag = secrets.token_hex(16), secrets.token_hex(8)
    workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    rfd, wfd = os.pipe()
    proc, clean = None, False
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        job = dict(job, nonce=nonce, result_fd=wfd, uid=uid, limits=limits, timeout_s=timeout_s,
                   namespace=namespace)
        env = dict(_CHILD_ENV, POSTTRAIN_SANDBOX=tag)  # the tag finds strays if the supervisor is killed
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd=workdir, env=env, start_new_session=True, close_fds=True,
            pass_fds=(wfd,),
        )
        os.close(wfd)
        wfd = -1
        _send(proc, json.dumps(job).encode())
        # The supervisor enforces timeout_s on the worker; this later deadline only catches a stuck supervisor.
        data, overran = _wait(proc.pid, rfd, time.monotonic() + timeout_s + _GRACE_S)
        _kill_group(proc.pid)  # the supervisor is a zombie at worst, so its group id cannot be reused yet
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        report = None if overran else _parse_report(data, proc.returncode)
        clean = report is not None
        return report, nonce, overran
    finally:
        if proc is not None and proc.returncode is None:  # interrupted (e.g. KeyboardInterrupt)
            _kill_group(proc.pid)
            proc.wait()
        if not clean and proc is not None:
            _kill_strays(tag)
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


def _classify(report: dict[str, Any], nonce: str, memory_mb: int, cpu_s: int) -> tuple[Any, str | None]:
    """Turn the supervisor's report on the worker into ``(value, None)`` or ``(None, error_kind)``."""
    if report["timed_out"]:
        return None, TIMEOUT
    try:
        msg = json.loads(report["result"]) if report["result"] else None
    except ValueError:
        msg = None
    if isinstance(msg, dict) and msg.get("nonce") == nonce:  # only our bootstrap knows the nonce
        if msg.get("error") is None:
            return msg.get("value"), None
        log.debug("sandbox: %s: %s", msg["error"], msg.get("detail"))
        return None, msg["error"] if msg["error"] in ERROR_KINDS else EXCEPTION
    code = os.waitstatus_to_exitcode(report["status"])
    if code >= 0:  # exited without a genuine result, e.g. os._exit(0) before the tests ran
        return None, EXCEPTION
    sig = -code
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and report.get("cpu_s", 0) >= cpu_s):
        return None, TIMEOUT
    # Killed by a signal near the memory limit: a C allocation that failed under RLIMIT_AS (abort, NULL
    # dereference) or the OOM killer. Resident memory stays below the address-space limit, hence half-way.
    if report.get("maxrss_kb", 0) * 1024 >= (memory_mb << 20) // 2:
        return None, MEMORY
    return None, CRASH
