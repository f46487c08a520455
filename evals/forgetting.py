"""Forgetting metrics over a pipeline's per-stage eval scores: pure functions, no I/O.

Input is a list of stage records in pipeline order, base first::

    [{"name": "base", "model": "<path>",
      "scores": {"<task>/<metric>": {"value": float, "stderr": float | None}},
      "trains_on": ["<task>", ...]},          # optional; may be empty
     ...]

A key's task is everything before its first "/". Every matrix below has shape (n_stages, n_keys), rows in
pipeline order and columns in the order of ``score_matrix``'s keys (sorted); a missing score is NaN.

Reference rows: a record with ``"reference": true`` is a model a stage reads but that is not a stage of the
run (a merge's specialists, a transfer's fine-tuned source), evaluated with the same suite so that the report
can show it beside the stages. ``score_matrix``, ``stderr_matrix`` and ``deltas_vs_base`` cover every row;
every other metric (forgetting, deltas vs previous, max drop, BWT, significant drops, the gate) is computed
over ``measured(stages)``, the base and the stages only, and its matrices have one row per measured stage
(``to_rows`` spreads them back over all rows, NaN at the references). A reference is not an earlier point of
the pipeline, so letting it count as "best earlier score" or "previous stage" would measure the wrong thing.

Lineage: a stage record may carry ``"parents": [<row name>, ...]``, the measured rows it was built from: the
stage its ``model`` input names (or the base, when that input is the base model) first, then every other
stage its config names (a merge's ``models:``, a transfer's source). A stage's *ancestors* are its parents,
their parents, and so on; a record without ``"parents"`` descends from the row just before it (a linear
pipeline, and every report written before lineage was recorded). The metrics that compare a stage with
earlier stages compare it only with its ancestors: ``forgetting`` (best ancestor score), ``deltas_vs_previous``
and the ``against="previous"`` drops (the first parent), ``backward_transfer`` (training stages on the final
stage's lineage). So in a branched pipeline a stage is never measured against a sibling it does not descend
from; in a linear one every earlier stage is an ancestor and the numbers are those of a plain chain. The
metrics against the base (``deltas_vs_base``, ``max_drop``, the ``against="base"`` drops, ``check_gate``)
compare every stage with the base, the run's fixed point of comparison, whatever its lineage; a stage whose
input is a model outside the run (``parents: []``) has no ancestors, so no forgetting and no parent delta.

Metrics and where they depart from their papers:

- ``forgetting``: Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning" (RWalk), eq. for f_j^k:
  the best score on a task at any earlier stage minus its score now, per evaluated key at every stage (base
  included as an earlier stage). Like the paper it is not clipped at 0, so a key that keeps improving has
  negative forgetting: this matrix is the raw material, not a headline.
- ``average_forgetting``: RWalk's F_k, the mean of f_j^k over the tasks learned before stage k, never over the
  task stage k trains. Here "learned before" is widened to every key the stage does not train (``trains_on``),
  because a post-training pipeline cares about held-out capabilities it never trained on. Each term is
  max(0, f_j^k) where the paper's is f_j^k, so that a side gain on one task never offsets a loss on another
  (the paper's tasks were trained before, so a term below 0 was rare there; held-out tasks often rise).
  ``earlier_only=True`` keeps only tasks an ancestor stage trains: the paper's set.
- ``forgetting_drops``: the keys behind that average, each fall below its best ancestor score with the
  two-sample z-test of ``significant_drops``, significant ones first: the report's headline is the first.
- ``changes_vs_parent``: the gain on the tasks a stage trains (and the side gains on the others), measured
  against the stage's first parent, the model it started from.
- ``backward_transfer``: Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning" (GEM),
  BWT = 1/(T-1) sum_{i<T} (R_{T,i} - R_{i,i}). The tasks are the stages that name ``trains_on``; R_{j,i} is
  the mean score over task i's keys after stage j. Departures: R_{T,i} is read at the *final* stage of the
  pipeline (the model it delivers), which is GEM exactly when a training stage comes last but also counts a
  trailing merge; terms whose task has no score at either stage are dropped and the mean is over the rest
  (``backward_transfer_note`` says which, and why BWT is None when it is, for the report to state).
- Every metric assumes higher is better; a lower-is-better metric (perplexity, loss) reads with its sign
  flipped.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

Stage = dict[str, Any]


def task_of(key: str) -> str:
    """The task part of a "task/metric" key: everything before the first "/" (the whole key if none)."""
    return key.split("/", 1)[0]


def _check(stages: list[Stage]) -> None:
    if not stages:
        raise ValueError("forgetting metrics need at least one stage (the base)")


def is_reference(stage: Stage) -> bool:
    """A reference row: an input model shown for comparison, not a stage of the run."""
    return bool(stage.get("reference"))


def measured(stages: list[Stage]) -> list[Stage]:
    """The base and the stages of the run, in order: the rows every forgetting metric is computed over."""
    return [s for s in stages if not is_reference(s)]


def _measured_rows(stages: list[Stage]) -> list[int]:
    _check(stages)
    rows = [i for i, s in enumerate(stages) if not is_reference(s)]
    if not rows:
        raise ValueError("forgetting metrics need the base among the rows; all of them are references")
    return rows


def to_rows(stages: list[Stage], matrix: np.ndarray) -> np.ndarray:
    """A matrix with one row per measured stage spread over all rows of `stages`; reference rows are NaN."""
    out = np.full((len(stages), matrix.shape[1]), np.nan)
    rows = _measured_rows(stages)
    out[rows] = matrix
    return out


def score_matrix(stages: list[Stage]) -> tuple[list[str], np.ndarray]:
    """Sorted keys seen in any stage and the (n_stages, n_keys) matrix of values; missing scores are NaN."""
    _check(stages)
    keys = sorted({k for s in stages for k in s.get("scores", {})})
    matrix = np.full((len(stages), len(keys)), np.nan)
    for i, stage in enumerate(stages):
        for j, key in enumerate(keys):
            score = stage.get("scores", {}).get(key)
            if score is not None and score.get("value") is not None:
                matrix[i, j] = float(score["value"])
    return keys, matrix


def stderr_matrix(stages: list[Stage]) -> tuple[list[str], np.ndarray]:
    """Like ``score_matrix`` for stderrs, with a missing stderr read as 0 (no sampling noise known)."""
    keys, _ = score_matrix(stages)
    matrix = np.zeros((len(stages), len(keys)))
    for i, stage in enumerate(stages):
        for j, key in enumerate(keys):
            score = stage.get("scores", {}).get(key) or {}
            if score.get("stderr") is not None:
                matrix[i, j] = float(score["stderr"])
    return keys, matrix


def measured_matrices(stages: list[Stage]) -> tuple[list[str], np.ndarray, np.ndarray, list[Stage]]:
    """(keys of all rows, scores, stderrs, stages) restricted to the measured rows; the keys stay those of
    every row so that columns line up with ``score_matrix``."""
    rows = _measured_rows(stages)
    keys, m = score_matrix(stages)
    _, se = stderr_matrix(stages)
    return keys, m[rows], se[rows], [stages[i] for i in rows]


def parent_rows(stages: list[Stage]) -> list[list[int]]:
    """Per measured row, the measured rows of its parents (first parent first); see "Lineage" above.

    The base has none; a record without ``"parents"`` has the row before it; a parent name that is no earlier
    measured row (a stage whose eval is missing, a model outside the run) is left out.
    """
    rows = measured(stages)
    _measured_rows(stages)
    out: list[list[int]] = [[]]
    for k in range(1, len(rows)):
        if "parents" not in rows[k]:
            out.append([k - 1])
            continue
        earlier = {s["name"]: i for i, s in enumerate(rows[:k])}
        out.append(list(dict.fromkeys(earlier[p] for p in rows[k]["parents"] if p in earlier)))
    return out


def ancestor_rows(stages: list[Stage]) -> list[list[int]]:
    """Per measured row, the sorted measured rows it descends from: parents, their parents, and so on."""
    ancestors: list[set[int]] = []
    for parents in parent_rows(stages):
        ancestors.append(set(parents).union(*(ancestors[p] for p in parents)))
    return [sorted(a) for a in ancestors]


def is_linear(stages: list[Stage]) -> bool:
    """True when every measured stage descends from exactly the row before it (a plain chain)."""
    return all(p == [k - 1] for k, p in enumerate(parent_rows(stages)) if k > 0)


def leaf_rows(stages: list[Stage]) -> list[int]:
    """Measured stages (base excluded) that are no other stage's parent: the ends of the branches, in order."""
    parents = parent_rows(stages)
    used = {p for ps in parents for p in ps}
    return [k for k in range(1, len(parents)) if k not in used]


def base_index(stages: list[Stage]) -> int:
    """Row of the base: the first row that is not a reference (the pipeline puts it first)."""
    return _measured_rows(stages)[0]


def deltas_vs_base(stages: list[Stage]) -> np.ndarray:
    """Score minus the base's score, per row and key, references included; the base row is 0 (NaN where
    the base lacks the key)."""
    _, m = score_matrix(stages)
    return m - m[base_index(stages)]


def deltas_vs_previous(stages: list[Stage]) -> np.ndarray:
    """Score minus the parent's score (the stage its ``model`` input names; in a linear pipeline the previous
    stage) over measured rows; NaN for the base and for a stage with no parent in the run."""
    _, m, _, _ = measured_matrices(stages)
    out = np.full_like(m, np.nan)
    for k, parents in enumerate(parent_rows(stages)):
        if parents:
            out[k] = m[k] - m[parents[0]]
    return out


def forgetting(stages: list[Stage]) -> np.ndarray:
    """RWalk forgetting (Chaudhry et al. 2018): best score at any ancestor minus the current score.

    Over measured rows; row 0 (base) is 0. NaN where the current score is missing or no ancestor has one. In a
    linear pipeline every earlier stage is an ancestor, which is the paper's "any earlier stage".
    """
    _, m, _, _ = measured_matrices(stages)
    out = np.full_like(m, np.nan)
    out[0] = m[0] - m[0]
    for k, ancestors in enumerate(ancestor_rows(stages)):
        if k and ancestors:
            # fmax ignores NaN unless both sides are NaN, so a missing stage does not hide other ancestors.
            out[k] = np.fmax.reduce(m[ancestors], axis=0) - m[k]
    return out


def trained_columns(stages: list[Stage], at: int = -1) -> list[int]:
    """Columns (of ``score_matrix``'s keys) whose task the measured stage at row `at` names in ``trains_on``."""
    keys, _, _, rows = measured_matrices(stages)
    tasks = set(rows[at].get("trains_on") or [])
    return [j for j, key in enumerate(keys) if task_of(key) in tasks]


def forgetting_columns(stages: list[Stage], at: int = -1, earlier_only: bool = False) -> list[int]:
    """The columns ``average_forgetting`` averages at measured row `at`: keys the stage does not train that have
    a forgetting value; with ``earlier_only``, only keys of tasks one of its ancestors trains."""
    keys, _, _, rows = measured_matrices(stages)
    k = at % len(rows)
    f = forgetting(stages)[k]
    trained = set(trained_columns(stages, k))
    cols = [j for j in range(len(keys)) if j not in trained and not np.isnan(f[j])]
    if earlier_only:
        earlier = {t for a in ancestor_rows(stages)[k] for t in rows[a].get("trains_on") or []}
        cols = [j for j in cols if task_of(keys[j]) in earlier]
    return cols if k else []


def average_forgetting(stages: list[Stage], at: int = -1, earlier_only: bool = False) -> float | None:
    """Average forgetting at measured row `at` (the last stage by default): the mean of max(0, f) over
    ``forgetting_columns`` (see the module docstring); None when there is no such key (or `at` is the base)."""
    cols = forgetting_columns(stages, at, earlier_only)
    if not cols:
        return None
    return float(np.maximum(forgetting(stages)[at][cols], 0.0).mean())


def forgetting_drops(stages: list[Stage], at: int = -1, z: float = 2.0) -> list[dict[str, Any]]:
    """The keys the measured stage at row `at` does not train whose score fell below their best ancestor score.

    Records ``{"key", "reference": the ancestor with the best score, "before", "after", "drop", "threshold",
    "significant"}`` with the z-test of ``significant_drops`` against that ancestor; significant drops first,
    then by size, ties in key order. The first is the report's headline. Empty for the base.
    """
    keys, m, se, rows = measured_matrices(stages)
    k = at % len(rows)
    ancestors, trained = ancestor_rows(stages)[k], set(trained_columns(stages, k))
    out = []
    for j in range(len(keys)):
        if not k or j in trained or not ancestors or np.isnan(m[k, j]) or np.isnan(m[ancestors, j]).all():
            continue
        best = ancestors[int(np.nanargmax(m[ancestors, j]))]  # the first maximum: the earliest ancestor
        drop = m[best, j] - m[k, j]
        if drop > 0:
            threshold = z * math.sqrt(se[best, j] ** 2 + se[k, j] ** 2)
            out.append({"key": keys[j], "reference": rows[best]["name"], "before": float(m[best, j]),
                        "after": float(m[k, j]), "drop": float(drop), "threshold": float(threshold),
                        "significant": bool(drop > threshold)})
    return sorted(out, key=lambda d: (not d["significant"], -d["drop"]))


def changes_vs_parent(stages: list[Stage], at: int = -1, trained: bool = True) -> list[dict[str, Any]]:
    """Per key the measured stage at row `at` trains (``trained=False``: every other key that rose), its
    change from the stage's first parent: ``{"key", "before", "after", "change"}``. Empty for the base and for a
    stage with no parent in the run; keys without a score at either end are left out."""
    keys, m, _, rows = measured_matrices(stages)
    k = at % len(rows)
    parents = parent_rows(stages)[k]
    if not parents:
        return []
    p, cols = parents[0], set(trained_columns(stages, k))
    out = []
    for j in range(len(keys)):
        change = m[k, j] - m[p, j]
        if np.isnan(change) or (j in cols) != trained or (not trained and not change > 0):
            continue
        out.append({"key": keys[j], "before": float(m[p, j]), "after": float(m[k, j]), "change": float(change)})
    return out


def max_drop(stages: list[Stage]) -> dict[str, Any]:
    """The largest fall below base over all later stages and keys.

    Returns ``{"drop": base - value, "stage": name, "key": key}``; ties go to the earliest stage, then the
    first key. When nothing falls below base the drop is 0.0 and stage and key are None; when no later stage
    shares a key with the base, all three are None. Reference rows are left out.
    """
    keys, m, _, stages = measured_matrices(stages)
    drops = m[0] - m[1:]  # (n_stages - 1, n_keys); positive means below base
    if drops.size == 0 or np.all(np.isnan(drops)):
        return {"drop": None, "stage": None, "key": None}
    flat = int(np.nanargmax(drops))  # row-major, so the first maximum is the earliest stage
    i, j = divmod(flat, len(keys))
    if drops[i, j] <= 0:
        return {"drop": 0.0, "stage": None, "key": None}
    return {"drop": float(drops[i, j]), "stage": stages[i + 1]["name"], "key": keys[j]}


def _drop_record(stages, keys, m, se, cur: int, ref: int, j: int, z: float, against: str) -> dict | None:
    drop = m[ref, j] - m[cur, j]
    threshold = z * math.sqrt(se[ref, j] ** 2 + se[cur, j] ** 2)
    if np.isnan(drop) or not drop > threshold:
        return None
    return {"stage": stages[cur]["name"], "key": keys[j], "against": against,
            "reference": stages[ref]["name"], "drop": float(drop), "threshold": float(threshold)}


def significant_drops(stages: list[Stage], z: float = 2.0) -> list[dict[str, Any]]:
    """Drops larger than z * sqrt(stderr_a^2 + stderr_b^2), a two-sample z-test on independent evals.

    Each stage after the base is compared with the base (``against="base"``) and with its parent, the stage
    its ``model`` input names (``against="previous"``, the previous stage in a linear pipeline; not repeated
    when the parent is the base, none when the stage has no parent in the run). A missing stderr counts as 0,
    so without stderrs any drop at all is flagged. Reference rows are left out.
    Records: ``{"stage", "key", "against", "reference", "drop", "threshold"}``.
    """
    keys, m, se, stages = measured_matrices(stages)
    parents = parent_rows(stages)
    flagged = []
    for cur in range(1, len(stages)):
        for j in range(len(keys)):
            refs = [(0, "base")] + [(p, "previous") for p in parents[cur][:1] if p != 0]
            for ref, against in refs:
                rec = _drop_record(stages, keys, m, se, cur, ref, j, z, against)
                if rec is not None:
                    flagged.append(rec)
    return flagged


def check_gate(stages: list[Stage], max_drop: dict[str, float]) -> list[str]:
    """One message per gated key whose score at the LAST stage is more than its allowance below base.

    A gate name with a "/" matches that full key; a bare task name matches all its metrics; a full-key entry
    overrides its task's entry. A gate name that matches no evaluated key, or a gated key that the last stage
    did not score, is also reported: a typo in a gate must not pass silently. Empty list means pass.
    Reference rows are left out: the gate compares the last stage with the base.
    """
    keys, m, _, stages = measured_matrices(stages)
    last = stages[-1]["name"]
    messages = []
    for name in max_drop:
        matched = name in keys if "/" in name else any(task_of(k) == name for k in keys)
        if not matched:
            messages.append(f"gate names {name!r} but no evaluated key matches it")
    for j, key in enumerate(keys):
        allowed = max_drop.get(key, max_drop.get(task_of(key)))
        if allowed is None:
            continue
        base, now = m[0, j], m[-1, j]
        if np.isnan(base) or np.isnan(now):
            messages.append(f"stage {last!r}: {key} cannot be gated (no score at base or at this stage)")
        elif base - now > allowed:
            messages.append(f"stage {last!r}: {key} fell {base - now:.3f} below base "
                            f"({base:.3f} -> {now:.3f}), more than the allowed {allowed:.3f}")
    return messages
