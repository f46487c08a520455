"""Builtin verifiable rewards for GRPO (DeepSeekMath, Shao et al. 2024): exact answers, numbers, math
equivalence, formats, unit tests and length.

Each is a plain function as in TRL, ``f(completions, **kwargs) -> list[float]``, registered in ``REWARDS``;
dataset columns (``answer``, ``tests``) arrive as keyword arguments, as TRL passes them. Departures:
``completions`` are plain strings here (``build_reward_funcs`` pulls the text out of conversational ones),
and a reward's settings are its keyword-only parameters, filled from ``RewardSpec.params``; ``timeout_s``,
``memory_mb`` and ``stats`` are keyword-only too but come from the spec itself.
"""
from __future__ import annotations

import inspect
import math
import re
import threading
from typing import Any, Callable, Sequence

from posttrain.registry import REWARDS, did_you_mean
from posttrain.rewards.sandbox import Tests, run_sandboxed

from posttrain.rewards.stats import RewardStats

# Keyword-only parameters that build_reward_funcs fills from the RewardSpec rather than from its params.
FROM_SPEC = ("timeout_s", "memory_mb", "stats")

# A number as written in answers: sign, thousands commas, decimals, exponent ("-1,234.5e3", ".5").
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
# A fenced code block: ```python, ```py or a bare ```.
_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def last_number(text: str) -> float | None:
    """The last number in ``text`` as a float, or None when there is none."""
    found = _NUMBER.findall(str(text))
    return float(found[-1].replace(",", "")) if found else None


def extract_code(text: str) -> str:
    """The last fenced code block of a completion, or the whole completion when it has none."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


@REWARDS.register("exact_match")
def exact_match(completions: list[str], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 where the completion, stripped, equals the answer, stripped; a missing answer scores 0."""
    return [float(a is not None and c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


@REWARDS.register("numeric_match")
def numeric_match(completions: list[str], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 where the last number in the completion equals the answer's number (its last, as in GSM8K's
    "... #### 72"), to a relative 1e-9."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        got, want = last_number(c), None if a is None else last_number(str(a))
        out.append(float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9)))
    return out


@REWARDS.register("math_verify")
def math_verify(completions: list[str], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 where Hugging Face's math-verify finds the completion equivalent to the answer ("1/2" = "0.5" =
    "$\\frac{1}{2}$", boxed answers included)."""
    # The import resolves the installed package, not this function of the same name.
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which works only in the main thread; elsewhere, no timeout.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    out = []
    for c, a in zip(completions, answer, strict=True):
        gold = parse(str(a), parsing_timeout=limit) if a is not None else []
        pred = parse(c, parsing_timeout=limit) if gold else []
        out.append(float(bool(pred) and verify(gold, pred, timeout_seconds=limit)))
    return out


@REWARDS.register("format_regex")
def format_regex(completions: list[str], *, pattern: str, **kwargs: Any) -> list[float]:
    """1.0 where ``re.search(pattern, completion, re.DOTALL)`` matches; anchor with ^ and $ for a whole match."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.search(c) is not None) for c in completions]


@REWARDS.register("length_penalty")
def length_penalty(completions: list[str], *, target_len: int, scale: float = 1e-3, **kwargs: Any) -> list[float]:
    """``-scale * max(0, len(completion) - target_len)``: zero up to the target, then linear in characters."""
    return [0.0 - scale * max(0, len(c) - target_len) for c in completions]  # 0.0 - : no -0.0


@REWARDS.register("code_exec")
def code_exec(
    completions: list[str],
    tests: Sequence[Any],
    *,
    max_procs: int = 16,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    stats: RewardStats | None = None,
    **kwargs: Any,
) -> list[float]:
    """1.0 where the row's tests (assert statements: a string or a list of strings) run to the end against the
    completion's code (its last fenced block, else all of it), in the sandbox.

    The tests run in a process of their own that calls into the completion's and compares the values it gets
    back (``harness.py``), so the completion cannot reach the verdict: replacing builtins, forging a result,
    exiting early or returning an always-equal object scores 0. A row without tests scores 0: code that merely
    runs proves nothing. A failed assert is a wrong answer; anything else that stops the code (timeout, memory,
    crash, fork_limit, exception) is counted in ``stats``.
    """
    out = []
    for c, t in zip(completions, tests, strict=True):
        test_src = "\n".join(map(str, t)) if isinstance(t, (list, tuple)) else str(t or "")
        if not test_src.strip():
            out.append(0.0)
            continue
        value, kind = run_sandboxed(Tests(extract_code(c), test_src), (), timeout_s=timeout_s, memory_mb=memory_mb,
                                    max_procs=max_procs)
        if kind is not None and stats is not None:
            stats.record("code_exec", kind)
        out.append(float(kind is None and value is True))
    return out


def check_params(name: str, fn: Callable[..., Any], params: dict[str, Any]) -> None:
    """Raise ValueError unless ``params`` names exactly the settable keyword-only parameters of builtin ``fn``
    (all required ones present, no unknown ones) with usable values."""
    kw = {p.name: p for p in inspect.signature(fn).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in FROM_SPEC}
    for key in params:
        if key in FROM_SPEC:
            raise ValueError(f"reward {name!r}: set {key!r} on the reward itself, not in params")
        if key not in kw:
            known = ", ".join(kw) or "none"
            raise ValueError(f"reward {name!r} has no param {key!r}{did_you_mean(key, list(kw))}; params: {known}")
    missing = [k for k, p in kw.items() if p.default is inspect.Parameter.empty and k not in params]
    if missing:
        raise ValueError(f"reward {name!r} needs params: {', '.join(missing)}")
    if "pattern" in params:
        try:
            re.compile(params["pattern"])
        except (re.error, TypeError) as e:
            raise ValueError(f"reward {name!r}: bad pattern {params['pattern']!r}: {e}") from None
    for key in ("target_len", "scale", "max_procs"):
        if key in params and (not isinstance(params[key], (int, float)) or params[key] < 0):
            raise ValueError(f"reward {name!r}: {key} must be a non-negative number, got {params[key]!r}")
    own_check = getattr(fn, "check_params", None)  # a reward's own checks of its params' values (ifeval, judge)
    if own_check is not None:
        own_check(params)
