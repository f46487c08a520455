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
    assert stats.by_kind() == {"timeout": 0, "memory": 0, "crash": 0, "fork_limit": 0, "exception": 1, "non_finite": 0}


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
    with pytest.raises(ValidationError, match="batch_size must be a whole number of at least 1, got 0"):
        RewardSpec(name="reward_model", params={"model": "some/folder", "batch_size": 0})
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


# ---------------------------------------------------------------- modules next to a user reward

HELPER_REWARD = '''
from scale_helper import SCALE  # next to this file, as a script would import it

def scaled(prompts, completions, **kwargs):
    import lazy_helper  # imported when called: still found
    return [SCALE * len(c) + lazy_helper.BONUS for c in completions]
'''


@pytest.fixture
def helper_reward(tmp_path, monkeypatch):
    """A reward file that imports two modules next to it, one of which imports a third; the folder is 0700
    (as pytest makes it), so a sandbox that drops to `nobody` could not read it."""
    (tmp_path / "helper_reward.py").write_text(HELPER_REWARD)
    (tmp_path / "scale_helper.py").write_text("from base_scale import BASE\nSCALE = 2 * BASE\n")
    (tmp_path / "base_scale.py").write_text("BASE = 1.5\n")
    (tmp_path / "lazy_helper.py").write_text("BONUS = 0.25\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path / "helper_reward.py"
    for name in ("scale_helper", "base_scale", "lazy_helper"):
        sys.modules.pop(name, None)


def test_user_reward_imports_modules_next_to_it_in_process(helper_reward):
    folder = str(helper_reward.parent)
    (fn,), _ = build_reward_funcs([{"name": f"{helper_reward}:scaled"}])  # imported here: a broken one stops
    assert fn(prompts=["p", "q"], completions=["ab", "abcd"]) == [6.25, 12.25]
    # Script-like while it imports, then last: the trainer's own later imports are not shadowed by it.
    assert sys.path[-1] == folder and sys.path.count(folder) == 1


@linux_only
def test_sandboxed_user_reward_imports_modules_next_to_it(helper_reward):
    stats = RewardStats()
    (fn,), _ = build_reward_funcs([{"name": f"{helper_reward}:scaled", "sandbox": True}], stats)
    assert fn(prompts=["p", "q"], completions=["ab", "abcd"]) == [6.25, 12.25]
    assert stats.count() == 0
    # Only what the file's import statements name reaches the child: not the folder itself.
    (helper_reward.parent / "dynamic.py").write_text(
        "import importlib\n\ndef f(completions, **kw):\n    importlib.import_module('base_scale')\n"
        "    return [1.0] * len(completions)\n")
    (fn,), _ = build_reward_funcs([{"name": f"{helper_reward.parent / 'dynamic.py'}:f", "sandbox": True}], stats)
    assert fn(prompts=["p"], completions=["a"]) == [0.0] and stats.count("exception") == 1


def test_a_missing_module_is_refused_when_the_name_is_checked(helper_reward):
    folder = helper_reward.parent
    (folder / "typo.py").write_text("from scale_helpr import SCALE\n\ndef f(completions, **kw):\n    return []\n")
    with pytest.raises(ValueError, match=r"typo.py': no module named 'scale_helpr' \(did you mean 'scale_helper'"):
        validate_reward_name(f"{folder / 'typo.py'}:f")
    # A module next to it that it imports is checked too, and the first file that lacks the module is named.
    (folder / "base_scale.py").write_text("import no_such_module_xyz\nBASE = 1\n")
    with pytest.raises(ValueError, match=r"base_scale.py', imported by reward file .*no module named 'no_such_"):
        validate_reward_name(f"{helper_reward}:scaled")
    # Left to the stage: imports that may be optional (in a def, a try) and files that set up sys.path.
    (folder / "optional.py").write_text(
        "import sys\ntry:\n    import no_such_module_xyz\nexcept ImportError:\n    pass\n\n"
        "def f(completions, **kw):\n    import no_such_module_xyz\n")
    (folder / "own_path.py").write_text("import sys\nsys.path.insert(0, '/opt/x')\nimport no_such_module_xyz\n\n"
                                        "def f(completions, **kw):\n    return []\n")
    validate_reward_name(f"{folder / 'optional.py'}:f")
    validate_reward_name(f"{folder / 'own_path.py'}:f")


# ---------------------------------------------------------------- a reward that never scores

def test_stats_name_the_rewards_that_failed_on_every_completion(user_file):
    stats = RewardStats()
    (user_file.parent / "bad.py").write_text(
        "def boom(completions, **kw):\n    raise RuntimeError('boom')\n\n"
        "def short(completions, **kw):\n    return [1.0]\n\n"
        "def once(completions, **kw):\n    return [1.0] * len(completions)\n")
    bad = user_file.parent / "bad.py"
    funcs, _ = build_reward_funcs([{"name": f"{bad}:boom"}, {"name": f"{bad}:short"}, {"name": f"{bad}:once"},
                                   {"name": "exact_match"}], stats)
    for completions in (["a", "b"], ["c", "d"]):
        for fn in funcs:
            fn(prompts=["p"] * 2, completions=completions, answer=["a", "x"])
    funcs[2](prompts=["p"], completions=["a", "b"])  # fails once (wrong length), after scoring earlier calls
    assert stats.failed_every_call() == {"boom": {"exception": 2}, "short": {"exception": 2}}
    restored = pickle.loads(pickle.dumps(stats))
    assert restored.failed_every_call() == stats.failed_every_call()
    stats.reset()
    assert stats.failed_every_call() == {}


@linux_only
def test_a_sandboxed_reward_fails_every_call_only_when_no_row_scored(tmp_path):
    (tmp_path / "rows.py").write_text(
        "def odd(completions, **kw):\n    return [1.0 / (len(completions[0]) % 2)]\n\n"
        "def never(completions, **kw):\n    return ['x']\n")
    stats = RewardStats()
    funcs, _ = build_reward_funcs([{"name": f"{tmp_path}/rows.py:odd", "sandbox": True},
                                   {"name": f"{tmp_path}/rows.py:never", "sandbox": True}], stats)
    assert [fn(prompts=["p"] * 2, completions=["a", "ab"]) for fn in funcs] == [[1.0, 0.0], [0.0, 0.0]]
    assert stats.failed_every_call() == {"never": {"exception": 2}}
