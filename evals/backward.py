"""GEM backward transfer over the report's rows (Lopez-Paz & Ranzato 2017), on the lineage of a stage: how much
the later stages changed the tasks the earlier stages trained. The rows, matrices and lineage: evals.forgetting.
"""
from __future__ import annotations

import numpy as np

from evals.forgetting import Stage, ancestor_rows, is_linear, measured_matrices, task_of


def _task_mean(m_row: np.ndarray, m_ref: np.ndarray, cols: list[int]) -> tuple[float, float] | None:
    """Means of two rows over the columns where both have a score, so both average the same keys."""
    both = [c for c in cols if not (np.isnan(m_row[c]) or np.isnan(m_ref[c]))]
    if not both:
        return None
    return float(m_row[both].mean()), float(m_ref[both].mean())


def backward_transfer(stages: list[Stage], at: int = -1) -> float | None:
    """GEM backward transfer (Lopez-Paz & Ranzato 2017): 1/(T-1) sum_{i<T} (R_{T,i} - R_{i,i}).

    T is measured row `at`, the final stage by default (see module docstring); the training stages are those
    on its lineage (its ancestors and itself) that name ``trains_on``, so a sibling branch's training never
    counts. Task i is the keys whose task is in the i-th training stage's ``trains_on``. None when fewer than
    two of them name ``trains_on`` or no term has scores. Reference rows are left out.
    """
    keys, m, _, stages = measured_matrices(stages)
    final = at % len(stages)
    lineage = ancestor_rows(stages)[final] + [final]
    trained = [i for i in lineage if stages[i].get("trains_on")]
    if len(trained) < 2:
        return None
    terms = []
    for i in trained[:-1]:  # i < T: every training stage but the last
        tasks = set(stages[i]["trains_on"])
        cols = [c for c, k in enumerate(keys) if task_of(k) in tasks]
        means = _task_mean(m[final], m[i], cols)
        if means is not None:
            terms.append(means[0] - means[1])
    return float(sum(terms) / len(terms)) if terms else None


def backward_transfer_note(stages: list[Stage], at: int = -1) -> str | None:
    """Why ``backward_transfer(stages, at)`` is None, or which of its terms it leaves out; None when every
    training stage before the last has its term.

    The causes, as the report states them: fewer than two training stages on the lineage; a stage whose
    ``trains_on`` names tasks no row scored (a typo, or a task the suite lacks); a stage whose tasks have no
    score at that stage or at the final one.
    """
    keys, m, _, rows = measured_matrices(stages)
    final = at % len(rows)
    lineage = ancestor_rows(stages)[final] + [final]
    trained = [i for i in lineage if rows[i].get("trains_on")]
    if len(trained) < 2:
        where = "" if is_linear(stages) else f" on the lineage of `{rows[final]['name']}`"
        return f"fewer than two stages{where} in the report name trains_on"
    scored = {task_of(k) for k in keys}
    causes = []
    for i in trained[:-1]:
        tasks = list(rows[i]["trains_on"])
        unscored = [t for t in tasks if t not in scored]
        cols = [c for c, k in enumerate(keys) if task_of(k) in tasks]
        if unscored:
            left = "its term is left out" if len(unscored) == len(tasks) else "left out of its term"
            causes.append(f"`{rows[i]['name']}` trains_on names {', '.join(unscored)}, which no eval scored ({left})")
        elif _task_mean(m[final], m[i], cols) is None:
            causes.append(f"`{rows[i]['name']}`'s trains_on tasks have no score there or at `{rows[final]['name']}`")
    return "; ".join(causes) or None
