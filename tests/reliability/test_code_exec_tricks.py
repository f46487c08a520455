"""Issue 20, item 1: a completion cannot game code_exec. Each trick below scored 1.0 on code that fails its
tests when the tests ran in the completion's own interpreter (RL finds such tricks); here each scores 0, and the
honest completions next to them score 1 (the harness still runs ordinary tests: classes, generators, in-place
mutation, expected exceptions, HumanEval's check(candidate)).

The task in every trick: `f(x)` returns x squared. The tricks do not compute it."""
from __future__ import annotations

import textwrap

import pytest

from posttrain.rewards import RewardStats, build_reward_funcs
from tests.reliability.sandboxing import isolation, linux_only, namespaces_work, no_strays  # noqa: F401

pytestmark = linux_only

TESTS = "assert f(2) == 4\nassert f(3) == 9\n"

TRICKS = {
    # The old harness ran the tests with `exec`, looked up in the builtins the completion had just changed.
    "builtins-swap": """
        import builtins
        builtins.exec = lambda *a, **k: None
        builtins.compile = lambda *a, **k: compile("pass", "x", "exec")
        def f(x):
            return 0
    """,
    # Find the result channel and its nonce in the interpreter (frames, gc), write a passing result, exit.
    "frame-walk-to-nonce": """
        import gc, json, os, sys
        found = []
        frame = sys._getframe()
        while frame is not None:
            found += [v for v in frame.f_locals.values() if isinstance(v, dict) and "nonce" in v]
            frame = frame.f_back
        found += [o for o in gc.get_objects() if isinstance(o, dict) and "nonce" in o]
        for nonce in {job["nonce"] for job in found}:
            forged = json.dumps({"nonce": nonce, "value": True, "error": None}).encode()
            for fd in range(3, 64):
                try:
                    os.write(fd, forged)
                except OSError:
                    pass
        os._exit(0)
    """,
    "always-equal": """
        class Anything:
            def __eq__(self, other):
                return True
            def __ne__(self, other):
                return False
            __hash__ = object.__hash__
        def f(x):
            return Anything()
    """,
    "always-equal-int-subclass": """
        class Int(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def f(x):
            return Int(0)
    """,
    "exit-before-tests": """
        import sys
        def f(x):
            return 0
        sys.exit(0)
    """,
    "os-exit-before-tests": """
        import os
        def f(x):
            return 0
        os._exit(0)
    """,
    # The tests use math.isclose / unittest / a builtin; the completion changes what those names mean.
    "patched-isclose": """
        import math
        math.isclose = lambda *a, **k: True
        def f(x):
            return 0.0
    """,
    "patched-unittest": """
        import unittest
        unittest.TestCase.assertEqual = lambda *a, **k: None
        def f(x):
            return 0
    """,
    "shadowed-builtin": """
        def abs(x):
            return 0
        def f(x):
            return 0.0
    """,
    # Find the tests' text (stdin, the interpreter's objects, files around) or the caller's constants, and
    # return the expected value.
    "reading-the-tests": """
        import gc, os, re, sys
        texts = []
        for path in ["/proc/self/fd/0"] + [os.path.join(d, n) for d in (".", "/tmp") for n in os.listdir(d)]:
            try:
                with open(path) as file:
                    texts.append(file.read(1 << 20))
            except (OSError, ValueError):
                pass
        texts += [o for o in gc.get_objects() if isinstance(o, str)]
        texts += [s for o in gc.get_objects() if isinstance(o, (list, dict, tuple))
                  for s in (o.values() if isinstance(o, dict) else o) if isinstance(s, str)]
        answers = {}
        for text in texts:
            for arg, want in re.findall(r"f\\((\\d+)\\) == (\\d+)", text):
                answers[int(arg)] = int(want)
        def f(x):
            if x in answers:
                return answers[x]
            consts = [c for c in sys._getframe(1).f_code.co_consts if isinstance(c, int) and c != x]
            return consts[0] if consts else 0
    """,
}
TEST_FOR = {
    "patched-isclose": "import math\nassert math.isclose(f(2), 4.0)\nassert math.isclose(f(3), 9.0)\n",
    "patched-unittest": "import unittest\nunittest.TestCase().assertEqual(f(2), 4)\n",
    "shadowed-builtin": "assert abs(f(2) - 4.0) < 1e-9\nassert abs(f(3) - 9.0) < 1e-9\n",
}


def _score(completion: str, tests: str, stats: RewardStats | None = None) -> float:
    (fn,), _ = build_reward_funcs([{"name": "code_exec", "timeout_s": 10}], stats or RewardStats())
    return fn(prompts=["p"], completions=[textwrap.dedent(completion)], tests=[tests])[0]


@pytest.mark.parametrize("trick", list(TRICKS))
def test_trick_scores_zero(trick, isolation, no_strays):
    assert _score(TRICKS[trick], TEST_FOR.get(trick, TESTS)) == 0.0


@pytest.mark.parametrize("tests", [TESTS, *TEST_FOR.values()], ids=["asserts", *TEST_FOR])
def test_the_tricks_tests_pass_an_honest_completion(tests, no_strays):
    assert _score("def f(x):\n    return x * x\n", tests) == 1.0


HONEST = {
    "class-methods": ("""
        class Stack:
            def __init__(self):
                self.items = []
            def push(self, x):
                self.items.append(x)
            def pop(self):
                return self.items.pop()
            def __len__(self):
                return len(self.items)
        """, "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and len(s) == 1 and s.items == [1]\n"
             "assert isinstance(s, Stack) and not isinstance(3, Stack)\n"),
    "generator": ("def squares(n):\n    for i in range(n):\n        yield i * i\n",
                  "assert list(squares(4)) == [0, 1, 4, 9]\nassert sum(squares(3)) == 5\n"),
    "in-place": ("def sort_in_place(xs):\n    xs.sort()\n",
                 "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]\n"),
    "values": ("""
        from fractions import Fraction
        MOD = 10 ** 9 + 7
        def f():
            return {"a": (1, 2.5, None), "b": {3, 4}, "c": b"x", "d": Fraction(1, 3), "e": 2 ** 100, "g": 1j}
        """, "from fractions import Fraction\nassert f() == {'a': (1, 2.5, None), 'b': {3, 4}, 'c': b'x', "
             "'d': Fraction(1, 3), 'e': 2 ** 100, 'g': 1j}\nassert MOD == 1000000007\n"),
    "expected-exception": ("def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x ** 0.5\n",
                           "try:\n    root(-1)\n    assert False\nexcept ValueError:\n    pass\n"
                           "assert root(4) == 2.0\n"),
    "humaneval": ("import math\ndef candidate_name(x):\n    return math.floor(x)\n"
                  "if __name__ == '__main__':\n    raise SystemExit('not run: the module is __sandbox__')\n",
                  "def check(candidate):\n    assert candidate(2.5) == 2\n    assert math.floor(1.5) == 1\n"
                  "check(candidate_name)\n"),
    "numpy": ("import numpy as np\ndef f(n):\n    return np.arange(n) * 2\ndef g():\n    return np.float64(0.5)\n",
              "assert list(f(3)) == [0, 2, 4]\nassert g() == 0.5\n"),
}


@pytest.mark.parametrize("case", list(HONEST))
def test_honest_completions_still_pass(case, no_strays):
    code, tests = HONEST[case]
    stats = RewardStats()
    assert _score(code, tests, stats) == 1.0, stats.as_metrics()
    wrong = textwrap.dedent(code) + "\nraise AssertionError('broken')\n"  # the same tests can fail
    assert _score(wrong, tests) == 0.0
