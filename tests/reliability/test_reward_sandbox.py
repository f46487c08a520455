"""Item 11: the reward sandbox. Reward code that hangs, forks without end, allocates without end or kills itself
scores 0 with its error kind and leaves the caller running (the next reward runs normally), and the sandboxed
process cannot read the parent's environment: not through os.environ, not through /proc/<ancestor>/environ.

Training going on around such rewards is tested on a tiny GRPO run in tests/test_grpo.py
(test_crashing_and_hanging_rewards_are_counted_and_training_finishes).

These tests run hostile code (endless loop, fork bomb, 10 GB allocation, segfault). The fork bomb is safe only
because the child runs as `nobody` under RLIMIT_NPROC; its test first checks that the drop happened, and every
sandbox test checks that no process it started outlives it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from posttrain.rewards import ERROR_KINDS, RewardStats, build_reward_funcs, run_sandboxed
from posttrain.rewards import sandbox
from posttrain.rewards.sandbox import FileFunction
from tests.reliability.sandboxing import (IS_ROOT, isolation, landlock_abi, linux_only, namespaces_work,  # noqa: F401
                                          no_strays, sandboxed_code_exec)

# The sandbox modules the uid-65534 driver below loads (the parent side and the child program's parts); they
# need only the standard library.
SANDBOX_MODULES = ("namespace", "confine", "harness", "child", "cgroup", "imports", "sandbox")

USER_REWARDS = '''
def where_am_i(prompts, completions, **kwargs):
    import os
    secret = os.environ.get("POSTTRAIN_TEST_SECRET")
    return [{"uid": os.getuid(), "cwd": os.getcwd(), "listing": os.listdir("."), "secret": secret}]

def hostile(prompts, completions, **kwargs):
    if completions[0] == "hang":
        while True:
            pass
    return [1.0]
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


@linux_only
@pytest.mark.skipif(not IS_ROOT, reason="the drop to nobody happens only when running as root")
def test_sandbox_drops_to_nobody(isolation, no_strays):
    code = "import os\nassert (os.getuid(), os.geteuid(), os.getgid(), os.getgroups()) == (65534, 65534, 65534, [])"
    assert run_sandboxed(code) == (True, None)
    assert run_sandboxed("import os\nos.setuid(0)") == (None, "exception")  # PermissionError: no way back


@linux_only
def test_sandbox_hides_secrets_and_uses_empty_temp_dir(user_file, monkeypatch, isolation, no_strays):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    value, kind = run_sandboxed(FileFunction(str(user_file), "where_am_i"), (), kwargs={
        "prompts": ["p"], "completions": ["c"]})
    assert kind is None
    seen = value[0]
    assert seen["secret"] is None and seen["listing"] == []
    if isolation == "namespace":  # the private tmpfs, gone with the namespace
        assert seen["cwd"] == "/tmp"
    else:  # a folder of its own on the host, removed afterwards
        assert os.path.basename(seen["cwd"]).startswith("posttrain-sandbox-") and not os.path.exists(seen["cwd"])
    assert seen["uid"] == (65534 if IS_ROOT else os.getuid())


@linux_only
def test_sandboxed_user_reward_fails_row_by_row(user_file, no_strays):
    stats = RewardStats()
    spec = {"name": f"{user_file}:hostile", "sandbox": True, "timeout_s": 1.0}
    (fn,), _ = build_reward_funcs([spec], stats)
    assert fn(prompts=["p", "q"], completions=["ok", "hang"], trainer_state=object()) == [1.0, 0.0]
    assert stats.count("timeout", "hostile") == 1 and stats.count() == 1


@linux_only
def test_process_limit_caps_forks(tmp_path, isolation, no_strays):
    if IS_ROOT:  # never fork in a loop unless the child really is `nobody` (RLIMIT_NPROC ignores root)
        assert run_sandboxed("import os\nassert os.getuid() == 65534") == (True, None)
    path = tmp_path / "forks.py"
    path.write_text(textwrap.dedent("""
        import os, time
        def fork_count(n):
            made = 0
            for _ in range(n):
                try:
                    pid = os.fork()
                except BlockingIOError:
                    break
                if pid == 0:
                    time.sleep(2)
                    os._exit(0)
                made += 1
            return made
    """))
    value, kind = run_sandboxed(FileFunction(str(path), "fork_count"), (40,), max_procs=8)
    assert kind is None and value <= 8 - 2  # the supervisor and the worker count too (and a namespace's init)


@linux_only
@pytest.mark.parametrize("code, kind", [
    ("while True:\n    pass", "timeout"),
    ("x = bytearray(10**10)", "memory"),
    ("import ctypes\nctypes.string_at(0)", "crash"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "crash"),
    ("import os, signal\nos.killpg(0, signal.SIGKILL)", "crash"),
    # Its supervisor; in a namespace the supervisor is out of sight: getppid() is 0, and kill(0) hits the
    # code's own process group.
    ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", {"plain": "exception", "namespace": "crash"}),
], ids=["hang", "allocation", "segfault", "self-kill", "group-kill", "kills-supervisor"])
def test_hostile_code_scores_zero_with_its_error_kind(code, kind, isolation, no_strays):
    kind = kind[isolation] if isinstance(kind, dict) else kind
    stats = RewardStats()
    assert sandboxed_code_exec(code, stats, timeout_s=1.0) == 0.0
    assert stats.by_kind() == {k: int(k == kind) for k in ERROR_KINDS}
    assert sandboxed_code_exec("x = 1", stats) == 1.0  # the caller goes on, and the next reward runs normally


@linux_only
def test_fork_bomb_is_contained(isolation, no_strays):
    if IS_ROOT:  # the bomb is safe only under RLIMIT_NPROC, which binds only a non-root uid
        value, kind = run_sandboxed("import os\nassert os.getuid() == 65534")
        if (value, kind) != (True, None):
            pytest.fail("the sandbox did not drop to uid 65534; refusing to run the fork bomb")
    stats = RewardStats()
    assert sandboxed_code_exec("import os\nwhile True:\n    os.fork()", stats, timeout_s=5.0) == 0.0
    assert stats.by_kind() == {k: int(k == "fork_limit") for k in ERROR_KINDS}
    # A bomb that swallows the error keeps forking until the deadline, and is still killed whole.
    assert sandboxed_code_exec("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                               "        pass", stats, timeout_s=1.0) == 0.0
    assert stats.count("timeout") == 1


@linux_only
def test_forged_result_does_not_pass(no_strays):
    stats = RewardStats()
    # Exiting "successfully" before the tests run is not a pass.
    assert sandboxed_code_exec("import os\nos._exit(0)", stats) == 0.0
    assert stats.count("exception") == 1


@linux_only
def test_reward_code_sees_only_its_own_namespace(namespaces_work, monkeypatch, no_strays):
    if not namespaces_work:
        pytest.skip("this kernel or container does not allow unprivileged user/pid namespaces")
    monkeypatch.setattr(sandbox, "_use_namespaces", True)
    code = textwrap.dedent("""
        import ctypes, os, signal
        assert (os.getpid(), os.getppid()) == (2, 0)  # the namespace's init is 1; the supervisor is outside
        assert sorted(p for p in os.listdir("/proc") if p.isdigit()) == ["1", "2"]
        with open("/proc/self/status") as f:
            assert "CapEff:\\t0000000000000000" in f.read()
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.umount2(b"/proc", 2) != 0  # no capability left to uncover the host's /proc (2: MNT_DETACH)
        try:
            os.kill(1, signal.SIGKILL)  # the namespace's init cannot be killed from inside
        except PermissionError:  # Landlock's signal scope refuses it outright
            pass
        try:
            os.kill(-1, signal.SIGKILL)  # every process it may signal, but itself and init: there is none
            assert False, "kill(-1) found a process to signal"
        except ProcessLookupError:
            pass
    """)
    assert run_sandboxed(code) == (True, None)


@linux_only
def test_reward_code_reaches_no_network_in_its_namespace(isolation, no_strays):
    """Model output run by a reward cannot reach a port of this machine (nor any host): in its namespace the
    network is a loopback that is down; without namespaces (the fallback), Landlock ABI 4+ refuses TCP connects.
    Without either the same code connects, so the test can fail."""
    import socket

    fenced = isolation == "namespace" or landlock_abi() >= 4
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = textwrap.dedent(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
                connected = True
            except OSError:
                connected = False
            assert connected == {not fenced}, connected
        """)
        assert run_sandboxed(code) == (True, None)


# Run as its own process, so the secret is in its initial environment (what /proc/<pid>/environ shows; a
# variable set later with os.environ is not). It loads only the sandbox modules: they need only the standard
# library, so any Python 3.9+ that uid `nobody` may run will do. Prints what the reward code could find.
DRIVER = r'''
import importlib.util, json, logging, os, sys, types
root, marker = sys.argv[1], sys.argv[2]
for name in ("posttrain", "posttrain.rewards"):  # skip the package __init__s (pydantic, torch)
    sys.modules[name] = types.ModuleType(name)
def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, *name.split(".")) + ".py")
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
for name in sys.argv[3].split(","):
    mod = load("posttrain.rewards." + name)
sandbox = mod
key, value = marker.split("=")
sandbox._CHILD_ENV[key] = value
warned = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: warned.append(record.getMessage())
logging.getLogger(sandbox.__name__).addHandler(handler)
SCAN = """
import os
def environs():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/environ" % pid, "rb") as f:
                yield f.read()
        except OSError:  # not ours to read, or gone
            pass
assert "hunter2" not in repr(os.environ) and not any(b"hunter2" in env for env in environs())
"""
clean = [sandbox.run_sandboxed(SCAN) == (True, None) for _ in range(2)]
fell_back = not sandbox._use_namespaces
sandbox._use_namespaces = False
clean.append(sandbox.run_sandboxed(SCAN) == (True, None))
print(json.dumps({"uid": os.getuid(), "clean": clean, "fell_back": fell_back, "warned": warned}))
'''


def _preexec(mask_proc: bool, as_nobody: bool):
    """preexec_fn: optionally mount a file over part of /proc (as Docker does), then become `nobody`."""
    def preexec():
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if mask_proc:  # CLONE_NEWNS; MS_REC | MS_PRIVATE; MS_BIND
            assert libc.unshare(0x20000) == 0 and libc.mount(None, b"/", None, 0x44000, None) == 0
            assert libc.mount(b"/dev/null", b"/proc/cmdline", None, 0x1000, None) == 0
        if as_nobody:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)  # before exec, so the driver is an ordinary (dumpable) process of that uid
    return preexec


def _python_for_nobody() -> str | None:
    """An interpreter uid 65534 may run (a pyenv under /root is out of its reach), or None."""
    for exe in (sys.executable, "/usr/bin/python3"):
        try:
            done = subprocess.run([exe, "-I", "-c", "import ctypes, json"], preexec_fn=_preexec(False, IS_ROOT),
                                  cwd="/", capture_output=True)
        except OSError:  # not even executable
            continue
        if done.returncode == 0:
            return exe
    return None


@pytest.fixture
def readable_sandbox_modules():
    """A copy of the sandbox modules in a fresh folder every user may read, for the driver that runs as `nobody`.

    The checkout may sit under a folder only root can enter (a clone under /root, a `mktemp -d`), which the
    driver could not import from; production never needs that (the sandboxed child gets its code on stdin)."""
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="posttrain-sandbox-modules-")
    try:
        package = os.path.join(root, "posttrain", "rewards")
        os.makedirs(package)
        for name in SANDBOX_MODULES:
            shutil.copyfile(os.path.join(os.path.dirname(sandbox.__file__), f"{name}.py"),
                            os.path.join(package, f"{name}.py"))
        for folder, dirs, files in os.walk(root):  # whatever the umask: nobody reads, nobody writes
            os.chmod(folder, 0o755)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@linux_only
@pytest.mark.parametrize("user, mask_proc", [("root", False), ("non-root", False), ("non-root", True),
                                             ("root", True)])
def test_reward_code_cannot_find_the_trainer_secret_in_proc(user, mask_proc, namespaces_work, no_strays,
                                                             readable_sandbox_modules):
    """The trainer (the driver) holds a secret in its environment; the reward code scans every readable
    /proc/<pid>/environ. Non-root, the namespace is what hides it, and without one Landlock (which forbids
    ptrace access out of the sandbox); with neither the same scan finds it. With /proc masked (Docker), the
    namespace fails: then Landlock, or one warning and the unprotected fallback."""
    if user == "root" and not IS_ROOT or mask_proc and not IS_ROOT:
        pytest.skip("needs root (to stay root, or to mount over /proc)")
    if user == "non-root" and not (mask_proc or namespaces_work):
        pytest.skip("this kernel or container does not allow unprivileged user/pid namespaces")
    exe = sys.executable if user == "root" else _python_for_nobody()
    if exe is None:
        pytest.skip("no Python interpreter that uid 65534 may run")
    env = {"PATH": "/usr/bin:/bin", "POSTTRAIN_TEST_SECRET": "hunter2"}
    done = subprocess.run([exe, "-I", "-c", DRIVER, readable_sandbox_modules, no_strays,
                           ",".join(SANDBOX_MODULES)], env=env, cwd="/", capture_output=True,
                          preexec_fn=_preexec(mask_proc, IS_ROOT and user == "non-root"), text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["uid"] == 0) == (user == "root")
    assert out["fell_back"] == mask_proc
    landlock = landlock_abi() >= 1
    if user == "root":  # as `nobody`, the trainer's /proc/<pid>/environ is closed with or without a namespace
        assert out["clean"] == [True, True, True] and out["warned"] == []
    elif mask_proc and not landlock:  # the known gap of the fallback, stated once
        assert out["clean"] == [False, False, False]
        assert len(out["warned"]) == 1 and "/proc/<pid>/environ" in out["warned"][0]
    else:
        assert out["clean"] == [True, True, landlock] and out["warned"] == []
