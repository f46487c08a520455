"""What the sandbox tests share: fixtures that run a test with and without the namespaces or the cgroup (the
fallbacks), that fail a test whose sandbox processes outlive it, and probes of what this kernel gives (checked
before a test runs code that is safe only under that protection)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import uuid

import pytest

from posttrain.rewards import RewardStats, build_reward_funcs, run_sandboxed, sandbox

IS_ROOT = os.geteuid() == 0
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none); the sandbox's worker asks the same way."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(0, libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))


@pytest.fixture
def no_strays(monkeypatch):
    """Mark this test's sandbox processes; afterwards kill any that survive, and fail the test if one did."""
    marker = f"POSTTRAIN_TEST_RUN={uuid.uuid4().hex}"
    key, value = marker.split("=")
    monkeypatch.setitem(sandbox._CHILD_ENV, key, value)
    yield marker
    strays = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read().split(b"\0"):
                    os.kill(int(entry), signal.SIGKILL)
                    strays.append(int(entry))
        except OSError:
            continue
    assert not strays, f"sandbox processes outlived the test: {strays}"


@pytest.fixture(scope="session")
def namespaces_work():
    """Whether this machine lets the sandbox make its user/pid namespace (it then runs as pid 2)."""
    saved = sandbox._use_namespaces
    sandbox._use_namespaces = True
    try:
        return run_sandboxed("import os\nassert os.getpid() == 2 and os.getppid() == 0") == (True, None)
    finally:
        sandbox._use_namespaces = saved


@pytest.fixture(params=["namespace", "plain"])
def isolation(request, monkeypatch, namespaces_work):
    """Run the test with the namespaces, then as where they are unavailable (the fallback)."""
    if request.param == "namespace" and not namespaces_work:
        pytest.skip("this kernel or container does not allow unprivileged user/pid namespaces")
    monkeypatch.setattr(sandbox, "_use_namespaces", request.param == "namespace")
    return request.param


@pytest.fixture(scope="session")
def cgroup_works():
    """Whether the sandbox can put a call in a memory cgroup here (root, or a delegated cgroup)."""
    from posttrain.rewards.cgroup import Cgroup

    group = Cgroup.create(256 << 20, 16)
    if group is None:
        return False
    group.remove()
    return True


@pytest.fixture(params=["cgroup", "shares"])
def memory_bound(request, monkeypatch, cgroup_works):
    """Run the test with the call's memory cgroup, then as without one (a few processes, memory_mb shared)."""
    if request.param == "cgroup" and not cgroup_works:
        pytest.skip("no memory cgroup can be made here (needs root or a delegated cgroup)")
    monkeypatch.setattr(sandbox, "_use_cgroups", request.param == "cgroup")
    return request.param


def sandboxed_code_exec(code: str, stats: RewardStats, timeout_s: float = 5.0, tests: str = "assert True",
                        memory_mb: int = 512) -> float:
    """Score ``code`` with the code_exec reward (which always sandboxes), by default with a trivially true test."""
    spec = {"name": "code_exec", "timeout_s": timeout_s, "memory_mb": memory_mb, "params": {"max_procs": 16}}
    (fn,), _ = build_reward_funcs([spec], stats)
    return fn(prompts=["p"], completions=[code], tests=[tests])[0]
