"""Verifiable rewards: builtins with exact values, names and configs, TRL's calling convention, and the sandbox.

The sandbox tests run hostile code (endless loop, fork bomb, 10 GB allocation, segfault). The fork bomb is
safe only because the child runs as `nobody` under RLIMIT_NPROC; its test first checks that the drop
happened, and every sandbox test checks that no process it started outlives it.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import textwrap
import uuid

import pytest
from pydantic import ValidationError

from posttrain.rewards import (
    ERROR_KINDS,
    RewardSpec,
    RewardStats,
    build_reward_funcs,
    completion_text,
    run_sandboxed,
    validate_reward_name,
)
from posttrain.rewards import builtin, sandbox
from posttrain.rewards.sandbox import FileFunction

IS_ROOT = os.geteuid() == 0
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")


def call(spec: dict, completions: list, **columns) -> list:
    """Build one reward from ``spec`` and call it the way TRL's GRPOTrainer does."""
    (fn,), _ = build_reward_funcs([spec])
    n = len(completions)
    return fn(prompts=["p"] * n, completions=completions, completion_ids=[[1, 2]] * n, trainer_state=object(),
              log_extra=lambda *a: None, log_metric=lambda *a: None, **columns)


# ---------------------------------------------------------------- builtins, exact values

def test_exact_match():
    assert call({"name": "exact_match"}, [" 42 \n", "41", "42", "42"], answer=["42", "42", " 42", None]) == [
        1.0, 0.0, 1.0, 0.0]


def test_numeric_match_takes_last_number():
    completions = ["so 3 apples make 1,234.", "x = -3.5, then 7", "no number", "2.50", "1e3"]
    answers = ["1234", "#### 7", "5", "2.5", "1000"]
    assert call({"name": "numeric_match"}, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert builtin.last_number("a -0.5 b .25") == 0.25
    assert builtin.last_number("none") is None


@pytest.mark.parametrize("answer, completion, expected", [
    ("0.5", "1/2", 1.0),
    ("1/2", "0.5", 1.0),
    ("0.5", "The answer is $\\frac{1}{2}$", 1.0),
    ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),
    ("$\\frac{1}{2}$", "1/2", 1.0),
    ("0.5", "0.6", 0.0),
    ("0.5", "no idea", 0.0),
])
def test_math_verify_equivalences(answer, completion, expected):
    assert call({"name": "math_verify"}, [completion], answer=[answer]) == [expected]


def test_format_regex():
    spec = {"name": "format_regex", "params": {"pattern": r"^<think>.*</think>\s*<answer>.*</answer>$"}}
    completions = ["<think>a\nb</think>\n<answer>4</answer>", "<answer>4</answer>", "x<think></think><answer></answer>"]
    assert call(spec, completions) == [1.0, 0.0, 0.0]


def test_length_penalty():
    spec = {"name": "length_penalty", "params": {"target_len": 10, "scale": 0.5}}
    assert call(spec, ["x" * 14, "x" * 10, "x" * 3]) == [-2.0, 0.0, 0.0]


@linux_only
def test_code_exec_passes_only_when_tests_pass():
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "def add(a, b):\n    return a - b"
    unterminated = 'def add(a, b):\n    return a + b\nx = """'  # must not swallow the tests into a string
    stats = RewardStats()
    (fn,), _ = build_reward_funcs([{"name": "code_exec", "timeout_s": 5}], stats)
    tests = [["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "assert add(1, 2) == 3", "assert add(2, 2) == 4",
             ""]
    assert fn(prompts=["p"] * 4, completions=[good, wrong, unterminated, good], tests=tests) == [1.0, 0.0, 0.0, 0.0]
    # A failed assert is a wrong answer; the syntax error is an exception; the row without tests is neither.
    assert stats.by_kind() == {"timeout": 0, "memory": 0, "crash": 0, "fork_limit": 0, "exception": 1}


# ---------------------------------------------------------------- TRL calling convention

def test_conversational_completions_and_names():
    stats = RewardStats()
    funcs, weights = build_reward_funcs(
        [{"name": "exact_match", "weight": 2.0}, RewardSpec(name="exact_match", weight=0.5)], stats)
    assert [f.__name__ for f in funcs] == ["exact_match", "exact_match_2"]
    assert weights == [2.0, 0.5]
    parts = [{"type": "text", "text": "4"}, {"type": "image"}, {"type": "text", "text": "2"}]
    conv = [[{"role": "assistant", "content": "42"}], [{"role": "assistant", "content": parts}]]
    prompts = [[{"role": "user", "content": "q"}]] * 2
    assert funcs[0](prompts=prompts, completions=conv, answer=["42", "42"]) == [1.0, 1.0]
    assert completion_text(None) == "" and completion_text({"role": "assistant", "content": "a"}) == "a"
    restored = pickle.loads(pickle.dumps(funcs))  # TRL's async GRPO ships rewards to a spawned process
    assert restored[1].__name__ == "exact_match_2"
    assert restored[0](prompts=["p"], completions=["42"], answer=["42"]) == [1.0]


def test_failing_reward_scores_zero_and_is_counted():
    stats = RewardStats()
    (fn,), _ = build_reward_funcs([{"name": "exact_match"}], stats)
    assert fn(prompts=["p", "q"], completions=["a", "b"]) == [0.0, 0.0]  # no `answer` column
    assert stats.count("exception", "exact_match") == 1
    metrics = stats.as_metrics()
    assert metrics["rewards/errors/exception"] == 1.0 and metrics["rewards/errors/exact_match/exception"] == 1.0
    assert set(stats.by_kind()) == set(ERROR_KINDS)


# ---------------------------------------------------------------- names and configs

def test_unknown_name_says_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'exact_match'"):
        validate_reward_name("exact_mach")
    with pytest.raises(ValidationError, match="did you mean 'math_verify'"):
        RewardSpec(name="math_verfy")


def test_spec_is_strict():
    with pytest.raises(ValidationError, match="Extra inputs"):
        RewardSpec(name="exact_match", wieght=2.0)
    with pytest.raises(ValidationError, match="needs params: pattern"):
        RewardSpec(name="format_regex")
    with pytest.raises(ValidationError, match="did you mean 'target_len'"):
        RewardSpec(name="length_penalty", params={"target_length": 5})
    with pytest.raises(ValidationError, match="bad pattern"):
        RewardSpec(name="format_regex", params={"pattern": "(unclosed"})
    with pytest.raises(ValidationError, match="sandbox applies to user rewards"):
        RewardSpec(name="exact_match", sandbox=True)
    assert RewardSpec(name="code_exec").model_dump() == {
        "name": "code_exec", "weight": 1.0, "sandbox": False, "timeout_s": 5.0, "memory_mb": 512, "params": {}}


USER_REWARDS = '''
def length_reward(prompts, completions, bonus=0.0, **kwargs):
    return [len(c) + bonus + (0.5 if a == "yes" else 0.0) for c, a in zip(completions, kwargs["answer"])]

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


def test_user_reward_name_is_checked_without_running_it(user_file):
    marker = user_file.parent / "imported.marker"
    user_file.write_text(f"open({str(marker)!r}, 'w').close()\n" + USER_REWARDS)
    validate_reward_name(f"{user_file}:length_reward")
    assert not marker.exists()  # parsed, not imported
    with pytest.raises(ValueError, match="did you mean 'length_reward'"):
        validate_reward_name(f"{user_file}:lenght_reward")
    with pytest.raises(ValueError, match="not found"):
        validate_reward_name(f"{user_file.parent / 'missing.py'}:f")


def test_user_reward_in_process(user_file):
    spec = {"name": f"{user_file}:length_reward", "params": {"bonus": 1.0}}
    (fn,), _ = build_reward_funcs([spec])
    assert fn.__name__ == "length_reward"
    assert fn(prompts=["p", "q"], completions=["abc", "a"], answer=["yes", "no"]) == [4.5, 2.0]


# ---------------------------------------------------------------- the sandbox

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
])
def test_hostile_code_scores_zero_with_its_error_kind(code, kind, no_strays):
    stats = RewardStats()
    assert sandboxed_code_exec(code, stats, timeout_s=1.0) == 0.0
    assert stats.by_kind() == {k: int(k == kind) for k in ERROR_KINDS}


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
