"""The claims' statistics, fixed before any run of the claims they decide (issue 23): pure functions of per-example
scores, so the rule that turns numbers into a verdict is tested apart from any training.

Every score is a mean of per-example scores (0/1 for the world's exact match and accuracy), measured on the same
test examples for every model and repeated over S seeds. For a comparison "a beats b" the per-example differences
d[s][i] = a[s][i] - b[s][i] are *paired* twice: by example (the same item scored by both models) and by seed (the
same seed's data order and draws). The estimate is the mean difference D over seeds and items; its standard error
treats seeds and items as two crossed random samples:

    se² = var_s(mean_i d[s]) / S  +  var_i(mean_s d[·][i]) / N      (sample variances, ddof 1)

The first term is the seed-to-seed spread of the difference, the second the item-to-item spread; each also
carries the seed × item residual once, so se is conservative by one residual term (a stricter test, never a
looser one). With one seed the first term is 0 and this is the usual paired test over items. A row's own
score is summarised the same way (mean over seeds and items, with the same two-term se).

Verdict: D > 2·se is *held*, D < -2·se *not held*, otherwise *not significant* (about a 95% two-sided test);
"the two rows match" (a premise of the matched-gain claims) is held when |D| <= 2·se.

Matched gain (claims 1 and 2): of a ladder of runs of one method that differ only in steps ("rungs"), each seed
uses the rung whose score on the trained task is closest to the other method's score in the same seed (ties go
to the rung with fewer steps): the first method's checkpoint "reaching the same score", without stopping on a
test score of the tasks the claim compares.
"""
from __future__ import annotations

import math
from statistics import fmean, variance

HELD, NOT_HELD, NOT_SIGNIFICANT = "held", "not held", "not significant"
Z = 2.0


def _crossed_se(x: list[list[float]]) -> float:
    """The two-term standard error of the mean of x[s][i] (seeds x items), as in the module docstring."""
    seeds, items = len(x), len(x[0])
    by_seed = [fmean(row) for row in x]
    by_item = [fmean(x[s][i] for s in range(seeds)) for i in range(items)]
    var_s = variance(by_seed) if seeds > 1 else 0.0
    var_i = variance(by_item) if items > 1 else 0.0
    return math.sqrt(var_s / seeds + var_i / items)


def _check(x: list[list[float]], what: str) -> None:
    if not x or not x[0] or any(len(row) != len(x[0]) for row in x):
        raise ValueError(f"{what}: every seed needs the same non-empty list of examples")


def summary(x: list[list[float]]) -> dict:
    """{"value": mean over seeds and items, "se": crossed se, "per_seed": [mean of each seed]}."""
    _check(x, "scores")
    return {"value": fmean(v for row in x for v in row), "se": _crossed_se(x),
            "per_seed": [fmean(row) for row in x]}


def paired(a: list[list[float]], b: list[list[float]], same: bool = False) -> dict:
    """The paired comparison of a[s][i] and b[s][i]: {"diff", "se", "per_seed", "verdict"}.

    `same`: the question is "do a and b match" (held when |diff| <= 2·se), not "does a beat b"."""
    _check(a, "a")
    if len(a) != len(b) or any(len(ra) != len(rb) for ra, rb in zip(a, b)):
        raise ValueError("a and b must hold the same seeds and examples")
    d = [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
    out = summary(d)
    diff, se = out["value"], out["se"]
    # 1e-9: scores are counts, so a difference of exactly 2·se must not flip on float rounding
    if same:
        verdict = HELD if abs(diff) <= Z * se + 1e-9 else NOT_HELD
    else:
        verdict = NOT_SIGNIFICANT if abs(diff) <= Z * se + 1e-9 else (HELD if diff > 0 else NOT_HELD)
    return {"diff": diff, "se": se, "per_seed": out["per_seed"], "verdict": verdict}


def closest(target: float, rungs: list[float]) -> int:
    """The index of the rung whose score is closest to `target`; ties go to the earlier (fewer steps) rung."""
    if not rungs:
        raise ValueError("no rungs to match")
    return min(range(len(rungs)), key=lambda k: (abs(rungs[k] - target), k))
