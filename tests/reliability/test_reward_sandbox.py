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

import os
import signal
import sys
import textwrap
import uuid

import pytest

from posttrain.rewards import ERROR_KINDS, RewardStats, build_reward_funcs, run_sandboxed
from posttrain.rewards import sandbox
from posttrain.rewards.sandbox import FileFunction

IS_ROOT = os.geteuid() == 0
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

USER_REWARDS = '''
def where_am_i(prompts, completions, **kwargs):
    import os
    secret = os.environ.get("POSTTRAIN_TEST_SECRET")
    return [{"uid": os.getuid(), "cwd": os.getcwd(), "listing": os.listdir("."), "secret": secret}]

def ancestors_environ(prompts, completions, **kwargs):
    """What /proc/<pid>/environ of every ancestor gives away (None where reading it is refused)."""
    import os
    pid, seen = os.getppid(), {}
    while pid > 1:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                seen[pid] = f.read().decode(errors="replace")
        except OSError:
            seen[pid] = None
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return [seen]

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


@pytest.fixture
def no_strays(monkeypatch):
    """Mark this test's sandbox processes; afterwards kill any that survive, and fail the test if one did."""
    marker = f"POSTTRAIN_TEST_RUN={uuid.uuid4().hex}"
    key, value = marker.split("=")
    monkeypatch.setitem(sandbox._CHILD_ENV, key, value)
    yield
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


def sandboxed_code_exec(code: str, stats: RewardStats, timeout_s: float = 5.0) -> float:
    """Score ``code`` with the code_exec reward (which always sandboxes) and a trivially true test."""
    spec = {"name": "code_exec", "timeout_s": timeout_s, "memory_mb": 512, "params": {"max_procs": 16}}
    (fn,), _ = build_reward_funcs([spec], stats)
    return fn(prompts=["p"], completions=[code], tests=["assert True"])[0]


@linux_only
@pytest.mark.skipif(not IS_ROOT, reason="the drop to nobody happens only when running as root")
def test_sandbox_drops_to_nobody(no_strays):
    code = "import os\nassert (os.getuid(), os.geteuid(), os.getgid(), os.getgroups()) == (65534, 65534, 65534, [])"
    assert run_sandboxed(code) == (True, None)
    assert run_sandboxed("import os\nos.setuid(0)") == (None, "exception")  # PermissionError: no way back


@linux_only
def test_sandbox_hides_secrets_and_uses_empty_temp_dir(user_file, monkeypatch, no_strays):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    value, kind = run_sandboxed(FileFunction(str(user_file), "where_am_i"), (), kwargs={
        "prompts": ["p"], "completions": ["c"]})
    assert kind is None
    seen = value[0]
    assert seen["secret"] is None
    assert seen["listing"] == [] and os.path.basename(seen["cwd"]).startswith("posttrain-sandbox-")
    assert not os.path.exists(seen["cwd"])  # removed afterwards
    assert seen["uid"] == (65534 if IS_ROOT else os.getuid())


@linux_only
def test_sandbox_cannot_read_the_environment_of_its_ancestors(user_file, monkeypatch, no_strays):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    value, kind = run_sandboxed(FileFunction(str(user_file), "ancestors_environ"), (), kwargs={
        "prompts": ["p"], "completions": ["c"]})
    assert kind is None
    seen = value[0]
    assert str(os.getpid()) in seen  # the walk reached this process, the trainer
    leaked = [pid for pid, env in seen.items() if env and "hunter2" in env]
    if leaked and not IS_ROOT:
        # Known gap: without root the sandbox keeps the trainer's uid, and Linux lets a process read the
        # /proc/<pid>/environ of a same-uid process that is dumpable. Closing it needs a separate uid or
        # prctl(PR_SET_DUMPABLE, 0) in the trainer (posttrain/rewards/sandbox.py).
        pytest.xfail("non-root: the sandbox can read a same-uid ancestor's /proc/<pid>/environ")
    assert not leaked, f"the secret is readable in /proc/<pid>/environ of {leaked}"


@linux_only
def test_sandboxed_user_reward_fails_row_by_row(user_file, no_strays):
    stats = RewardStats()
    spec = {"name": f"{user_file}:hostile", "sandbox": True, "timeout_s": 1.0}
    (fn,), _ = build_reward_funcs([spec], stats)
    assert fn(prompts=["p", "q"], completions=["ok", "hang"], trainer_state=object()) == [1.0, 0.0]
    assert stats.count("timeout", "hostile") == 1 and stats.count() == 1


@linux_only
def test_process_limit_caps_forks(tmp_path, no_strays):
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
    assert kind is None and value <= 8 - 2  # the supervisor and the worker count too


@linux_only
@pytest.mark.parametrize("code, kind", [
    ("while True:\n    pass", "timeout"),
    ("x = bytearray(10**10)", "memory"),
    ("import ctypes\nctypes.string_at(0)", "crash"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "crash"),
    ("import os, signal\nos.killpg(0, signal.SIGKILL)", "crash"),
    ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "exception"),  # its supervisor
], ids=["hang", "allocation", "segfault", "self-kill", "group-kill", "kills-supervisor"])
def test_hostile_code_scores_zero_with_its_error_kind(code, kind, no_strays):
    stats = RewardStats()
    assert sandboxed_code_exec(code, stats, timeout_s=1.0) == 0.0
    assert stats.by_kind() == {k: int(k == kind) for k in ERROR_KINDS}
    assert sandboxed_code_exec("x = 1", stats) == 1.0  # the caller goes on, and the next reward runs normally


@linux_only
def test_fork_bomb_is_contained(no_strays):
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
