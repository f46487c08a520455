"""Forgetting mitigated by interpolation: the pure part (judging each α on dev scores, choosing one) and the
report's part (the mitigation section of forgetting.md, the trade-off plot, forgetting.json's numbers).

WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): θ(α) = parent + α·(stage − parent)
keeps much of what the stage gained at a fraction of what it forgot. posttrain.mitigate writes θ(α) for each α
of `eval.mitigate_alphas` and scores it on the dev splits; this module judges each one with the gate's own rule
(`check_gate`: every `eval.max_drop` key within its allowance below the base, on dev scores) and keeps the
largest α that passes, ties broken by the trained tasks' dev gain over the parent. The test split is never
read here: choosing on it would make the report's test scores of the kept model optimistic.

A stage folder holding a mitigation has `mitigation.json` (`trial` records below, the kept α); the report
rebuilds its section from those files, so `posttrain report` shows it too.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evals.forgetting import check_gate, task_of

MITIGATION_FILE = "mitigation.json"


def _value(scores: dict, key: str) -> float:
    v = (scores.get(key) or {}).get("value")
    return float(v) if isinstance(v, (int, float)) else math.nan


def trial(alpha: float, scores: dict, base_dev: dict, parent_dev: dict, max_drop: dict[str, float],
          trains_on: list[str]) -> dict[str, Any]:
    """One α judged on dev scores: `ok` when the gate passes (its `messages` otherwise), `drops` (base minus
    θ(α) on each gated key), `worst_drop`, and `gain`: the mean over the trained tasks' keys of θ(α) minus the
    parent (NaN when the stage trains no scored task)."""
    rows = [{"name": "base", "folder": "00_base", "scores": base_dev},
            {"name": f"alpha={alpha:g}", "folder": "xx", "scores": scores}]
    messages = check_gate(rows, max_drop)
    gated = [k for k in scores if k in max_drop or task_of(k) in max_drop]
    drops = {k: _finite(_value(base_dev, k) - _value(scores, k)) for k in gated}
    trained = [k for k in scores if task_of(k) in trains_on and k in parent_dev]
    gains = [_value(scores, k) - _value(parent_dev, k) for k in trained]
    known = [d for d in drops.values() if d is not None]
    return {"alpha": alpha, "scores": scores, "ok": not messages, "messages": messages, "drops": drops,
            "worst_drop": max(known) if known else None, "gain": _finite(sum(gains) / len(gains)) if gains else None}


def _finite(v: float) -> float | None:
    """None for NaN: the files are strict JSON."""
    return None if math.isnan(v) else v


def choose(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The largest α whose dev drops all pass the gate, ties broken by the dev gain; None when none passes.
    The stage itself (α = 1, marked `stage`) is shown but never chosen: it is what broke the gate."""
    ok = [t for t in trials if t["ok"] and not t.get("stage")]
    return max(ok, key=lambda t: (t["alpha"], -math.inf if t["gain"] is None else t["gain"]), default=None)


def best_tradeoff(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The α with the smallest worst dev drop (for the message when none passes)."""
    tried = [t for t in trials if not t.get("stage") and t["worst_drop"] is not None]
    return min(tried, key=lambda t: (t["worst_drop"], -t["alpha"]), default=None)


def describe(t: dict[str, Any]) -> str:
    return f"α={t['alpha']:g}: dev gain {_cell(t['gain'], '+.3f')}, worst dev drop {_cell(t['worst_drop'], '.3f')}"


# ---------------------------------------------------------------------------------------------- the report


def mitigations(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Stage name -> its mitigation.json, for every stage folder of the run that holds one."""
    out = {}
    for path in sorted((run_dir / "stages").glob(f"[0-9]*/{MITIGATION_FILE}")):
        out[path.parent.name.split("_", 1)[1]] = json.loads(path.read_text())
    return out


def _cell(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def sections(run_dir: Path, report_dir: Path) -> list[str]:
    """The "Mitigation" section of forgetting.md (one table and trade-off plot per mitigated stage); the plots
    are written into `report_dir` as mitigation_<stage>.png."""
    found = mitigations(run_dir)
    for old in report_dir.glob("mitigation_*.png"):  # of a mitigation since undone
        if old.stem.removeprefix("mitigation_") not in found:
            old.unlink(missing_ok=True)
    if not found:
        return []
    parts = ["## Mitigation\n\nA stage that broke `eval.max_drop` was replaced by θ(α) = parent + α·(stage − parent) "
             "(WiSE-FT, Wortsman et al. 2022): the largest α of the grid whose drops below the base are all within "
             "the limits on the **dev** splits (the test split never chose). The stage's trained model is the "
             "`<stage>:unmitigated` row of the scores table; the stage's row is the model kept."]
    for name, m in found.items():
        kept = m.get("chosen")
        lines = [f"### `{name}`: " + (f"mitigated: interpolate α={kept:g}" if kept is not None else "no α passed"),
                 "", "| α | dev gain on trained tasks | worst dev drop | passes | kept |", "|---|---|---|---|---|"]
        for t in m["trials"]:
            lines.append(f"| {t['alpha']:g}{' (stage)' if t.get('stage') else ''} | {_cell(t['gain'], '+.3f')} | "
                         f"{_cell(t['worst_drop'], '.3f')} | {'yes' if t['ok'] else 'no'} | "
                         f"{'**yes**' if kept is not None and t['alpha'] == kept and not t.get('stage') else ''} |")
        png = f"mitigation_{name}.png"
        (report_dir / png).write_bytes(tradeoff_png(name, m))
        lines += ["", f"![trade-off of {name}]({png})"]
        parts.append("\n".join(lines))
    return ["\n\n".join(parts) + "\n"]


def tradeoff_png(name: str, m: dict[str, Any]) -> bytes:
    """Trained-task dev gain against worst dev drop, one point per α tried, the kept one ringed, the tightest
    allowance as a dashed line."""
    fig = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pts = [t for t in m["trials"] if t["gain"] is not None and t["worst_drop"] is not None]
    ax.plot([t["worst_drop"] for t in pts], [t["gain"] for t in pts], "o-", color="#4477aa")
    for t in pts:
        ax.annotate(f"α={t['alpha']:g}", (t["worst_drop"], t["gain"]), textcoords="offset points", xytext=(5, 4))
        if m.get("chosen") == t["alpha"] and not t.get("stage"):
            ax.plot([t["worst_drop"]], [t["gain"]], "o", ms=14, mfc="none", mec="#cc3311", mew=2)
    if m.get("max_drop"):
        ax.axvline(min(m["max_drop"].values()), ls="--", color="#999999")
    ax.set_xlabel("worst drop below base (dev)")
    ax.set_ylabel("gain on trained tasks (dev)")
    ax.set_title(f"{name}: interpolation with its parent")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def json_part(run_dir: Path) -> dict[str, Any]:
    """forgetting.json's `mitigation`: per stage, the grid, every α's dev figures and the kept α."""
    return {name: {"chosen": m.get("chosen"), "alphas": m["alphas"], "max_drop": m["max_drop"],
                   "trials": [{k: t[k] for k in ("alpha", "gain", "worst_drop", "drops", "ok")} | {"stage": bool(t.get("stage"))}
                              for t in m["trials"]]}
            for name, m in mitigations(run_dir).items()}
