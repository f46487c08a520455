"""Verifiable rewards: builtins with exact values, names and configs, TRL's calling convention.

The sandbox that runs untrusted reward code (hang, fork bomb, allocation, crash, secrets) is tested in
tests/reliability/test_reward_sandbox.py.
"""
from __future__ import annotations

import pickle
import sys

import pytest
from pydantic import ValidationError

from posttrain.rewards import (
    ERROR_KINDS,
    RewardSpec,
    RewardStats,
    build_reward_funcs,
    completion_text,
    validate_reward_name,
)
from posttrain.rewards import builtin

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
