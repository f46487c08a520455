"""Issue 20, item 5: a reward value that is not a finite number in range (inf, nan, 1e308: one zeroes the
advantages of its whole group) scores 0 and is counted as `non_finite`; an in-process user reward that hangs is
stopped at its wall-clock limit (`timeout_s` per completion) and counted as `timeout`; training goes on."""
from __future__ import annotations

import math
import time

import pytest

from posttrain.rewards import MAX_ABS_REWARD, RewardStats, build_reward_funcs
from tests.reliability.sandboxing import linux_only, no_strays  # noqa: F401

USER_REWARDS = '''
import time

def values(prompts, completions, **kwargs):
    table = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"), "huge": 1e308, "ok": 0.5,
             "none": None, "big-int": 10 ** 7}
    return [table[c] for c in completions]

def hang(prompts, completions, **kwargs):
    if completions[0] == "loop":
        while True:
            pass
    if completions[0] == "sleep":
        time.sleep(3600)
    if completions[0] == "swallow":  # a reward that catches everything it can
        while True:
            try:
                time.sleep(0.01)
            except Exception:
                pass
    return [1.0 for _ in completions]
'''


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "values.py"
    path.write_text(USER_REWARDS)
    return path


@pytest.mark.parametrize("sandbox", [False, pytest.param(True, marks=linux_only)])
def test_non_finite_or_huge_rewards_score_zero_and_are_counted(rewards_file, sandbox, no_strays):
    stats = RewardStats()
    (fn,), _ = build_reward_funcs([{"name": f"{rewards_file}:values", "sandbox": sandbox}], stats)
    completions = ["inf", "-inf", "nan", "huge", "big-int", "ok", "none"]
    got = fn(prompts=["p"] * len(completions), completions=completions)
    assert got == [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, None]
    assert all(v is None or math.isfinite(v) for v in got)
    assert stats.count("non_finite", "values") == 5 and stats.count() == 5
    assert stats.as_metrics()["rewards/errors/non_finite"] == 5.0
    assert 10 ** 7 > MAX_ABS_REWARD


@pytest.mark.parametrize("completion", ["loop", "sleep", "swallow"])
def test_hanging_in_process_reward_is_stopped(rewards_file, completion):
    stats = RewardStats()
    (fn,), _ = build_reward_funcs([{"name": f"{rewards_file}:hang", "timeout_s": 0.5}], stats)
    start = time.monotonic()
    assert fn(prompts=["p"], completions=[completion]) == [0.0]
    assert time.monotonic() - start < 60  # a hang guard, not a timing: the limit is 0.5 s
    assert stats.count("timeout", "hang") == 1 and stats.count() == 1
    assert fn(prompts=["p", "q"], completions=["ok", "ok"]) == [1.0, 1.0]  # the next call runs normally
    assert stats.count() == 1
