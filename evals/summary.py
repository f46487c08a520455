"""What the forgetting report states, as one JSON-ready dict (``build_report``): pure functions, no I/O.

The metrics are evals.forgetting's. This module puts them together per stage, the figures a reader looks
for first: what the stage gained on the tasks it trains, and what it forgot of the others, as two separate
figures, so that a gain never reads as "negative forgetting" (see ``average_forgetting`` for how that departs
from Chaudhry et al.'s F_k). The run-level summary repeats the last stage's figures (the model the run
delivers; each branch end's when stages branch) beside GEM's backward transfer and the largest drop below
base at any stage.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from evals.backward import backward_transfer, backward_transfer_note
from evals.forgetting import (Stage, average_forgetting, changes_vs_parent, deltas_vs_base, deltas_vs_previous, forgetting, forgetting_columns,
                              forgetting_drops, leaf_rows, max_drop, measured, parent_rows, score_matrix,
                              significant_drops, to_rows)


def stage_summary(stages: list[Stage], at: int, z: float = 2.0) -> dict[str, Any]:
    """The figures of the measured stage at row `at` (not the base).

    ``{"stage", "trains_on", "compared_with": its first parent (what the gains are measured from; None
    without one), "gain": the mean change over the keys of its ``trains_on`` tasks (None when none is
    scored), "gains": per key, "forgetting": ``average_forgetting`` over the keys it does not train,
    "forgetting_keys": how many keys that is, "forgetting_earlier_tasks": the same over tasks an ancestor
    trained (Chaudhry's set; None when no ancestor trains a scored task), "drops": ``forgetting_drops``
    (significant first), "significant_drops": their keys, "side_gains": other keys that rose}``.
    """
    rows = measured(stages)
    k = at % len(rows)
    gains = changes_vs_parent(stages, k)
    parents = parent_rows(stages)[k]
    drops = forgetting_drops(stages, k, z=z)
    return {
        "stage": rows[k]["name"], "trains_on": list(rows[k].get("trains_on") or []),
        "compared_with": rows[parents[0]]["name"] if parents else None,
        "gain": float(np.mean([g["change"] for g in gains])) if gains else None, "gains": gains,
        "forgetting": average_forgetting(stages, k), "forgetting_keys": len(forgetting_columns(stages, k)),
        "forgetting_earlier_tasks": average_forgetting(stages, k, earlier_only=True),
        "drops": drops, "significant_drops": [d["key"] for d in drops if d["significant"]],
        "side_gains": changes_vs_parent(stages, k, trained=False),
    }


def stage_summaries(stages: list[Stage], z: float = 2.0) -> list[dict[str, Any]]:
    """``stage_summary`` of every measured stage after the base, in pipeline order."""
    return [stage_summary(stages, k, z) for k in range(1, len(measured(stages)))]


def headline(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stage summary's first drop (the largest significant one, else the largest) with the stage's name; None
    when nothing fell."""
    if not summary or not summary["drops"]:
        return None
    return {"stage": summary["stage"], **summary["drops"][0]}


def _end_figures(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The figures the run-level summary (and each branch end) repeats from a stage summary."""
    s = summary or {}
    return {"average_forgetting": s.get("forgetting"), "forgetting_keys": s.get("forgetting_keys", 0),
            "average_forgetting_earlier_tasks": s.get("forgetting_earlier_tasks"),
            "gain_on_trained": s.get("gain"), "headline": headline(summary)}


def branch_summaries(stages: list[Stage], per_stage: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The end figures and GEM backward transfer at the end of every branch (``leaf_rows``), in pipeline
    order, when there are two or more ends; empty for a chain, whose only end is the last stage that the
    run-level figures already describe. Two branches from one base are two models a run delivers side by side
    (full vs HFT fine-tuning, say), so each gets its own figures. ``per_stage``: ``stage_summaries(stages)``."""
    leaves = leaf_rows(stages)
    if len(leaves) < 2:
        return []
    rows = measured(stages)
    return [{"stage": rows[k]["name"], **_end_figures(per_stage[k - 1]),
             "backward_transfer": backward_transfer(stages, at=k),
             "backward_transfer_note": backward_transfer_note(stages, at=k)} for k in leaves]


def _json_safe(obj: Any) -> Any:
    """Recursively turn NaN/inf into None, and numpy values and paths into plain Python, for strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, os.PathLike):  # a stage's "model" may arrive as a pathlib.Path
        return os.fspath(obj)
    return obj


def build_report(stages: list[Stage], z: float = 2.0) -> dict[str, Any]:
    """Everything the forgetting report shows, JSON-serialisable (NaN -> None).

    ``{"stages": [...as given...], "tasks": {key: {"delta_vs_base": [...], "delta_vs_previous": [...],
    "forgetting": [...]}}, "stage_summaries": [stage_summary per stage after the base],
    "summary": {"average_forgetting", "forgetting_keys", "average_forgetting_earlier_tasks",
    "gain_on_trained", "headline" (the last stage's), "max_drop", "backward_transfer",
    "backward_transfer_note"[, "branches"]}, "significant_drops": [...]}``. Each per-task list has one entry
    per row of ``stages``, references included: their ``delta_vs_base`` is measured, their
    ``delta_vs_previous`` (the delta vs the parent) and ``forgetting`` (RWalk's signed f) are None.
    ``summary["branches"]`` is there only when the pipeline branches (see ``branch_summaries``).
    """
    keys, _ = score_matrix(stages)
    d_base = deltas_vs_base(stages)
    d_prev, forg = to_rows(stages, deltas_vs_previous(stages)), to_rows(stages, forgetting(stages))
    tasks = {key: {"delta_vs_base": d_base[:, j], "delta_vs_previous": d_prev[:, j],
                   "forgetting": forg[:, j]} for j, key in enumerate(keys)}
    per_stage = stage_summaries(stages, z=z)
    summary = {**_end_figures(per_stage[-1] if per_stage else None), "max_drop": max_drop(stages),
               "backward_transfer": backward_transfer(stages), "backward_transfer_note": backward_transfer_note(stages)}
    branches = branch_summaries(stages, per_stage)
    if branches:
        summary["branches"] = branches
    return _json_safe({"stages": stages, "tasks": tasks, "stage_summaries": per_stage, "summary": summary,
                       "significant_drops": significant_drops(stages, z=z)})
