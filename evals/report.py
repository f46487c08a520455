"""Render the forgetting report of a run: ``<run-dir>/report/forgetting.{json,md,png}``.

::

    <out_dir>/                 usually <run-dir>/report/
      forgetting.json          build_report(stages): stages as given, per-key deltas and forgetting, summary;
                               "not_comparable" and "pending" when write_report was given any
      forgetting.md            scores table (a "from" column when stages branch), the rows left out as not
                               comparable, the stages a run has still to evaluate, forgetting table, flagged
                               drops, summary (per branch when stages branch), extra sections
      forgetting.png           one line per key from each stage to its parent, error bars where stderrs are known

Each file is written to a temporary file in ``out_dir`` and renamed into place, so a reader never sees a
half-written report. The metrics themselves live in ``evals.forgetting``; this module only formats them.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import numpy as np
# The Figure API with an explicit Agg canvas renders headless without pyplot, so importing this module never
# switches the backend of the caller's process (a notebook, say) and leaves no global figures open.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evals.forgetting import (Stage, base_index, build_report, forgetting, is_linear, is_reference, measured,
                              parent_rows, score_matrix, stderr_matrix)
from posttrain.rundir import atomic_write_bytes

NA = "n/a"


def fmt_value(x: float | None) -> str:
    """A score with 3 decimals, or "n/a" when missing."""
    return NA if x is None or math.isnan(x) else f"{x:.3f}"


def fmt_delta(x: float | None) -> str:
    """A signed change with 3 decimals; a change that rounds to zero reads "+0.000", never "-0.000"."""
    if x is None or math.isnan(x):
        return NA
    return "+0.000" if round(x, 3) == 0 else f"{x:+.3f}"


def score_cell(value: float, stderr: float | None, delta: float | None) -> str:
    """ "0.512 ± 0.020 (+0.130)"; the ± part is left out without a stderr, the (delta) part when None."""
    if math.isnan(value):
        return NA
    cell = fmt_value(value)
    if stderr is not None:
        cell += f" ± {stderr:.3f}"
    if delta is not None and not math.isnan(delta):
        cell += f" ({fmt_delta(delta)})"
    return cell


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub pipe table padded to equal column widths so it also reads in a terminal."""
    cells = [[c.replace("|", "\\|") for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _stderr_of(stage: Stage, key: str) -> float | None:
    return (stage.get("scores", {}).get(key) or {}).get("stderr")


def _trains_on_cell(stage: Stage) -> str:
    if is_reference(stage):
        return f"input of {stage['input_of']}" if stage.get("input_of") else "input"
    return ", ".join(stage.get("trains_on") or []) or "–"


def from_cells(stages: list[Stage]) -> list[str]:
    """Per row, the parents a stage was built from ("–" for the base and reference rows; "outside the run"
    for a stage whose input is a model outside the run; "<name> (left out)" for a parent without a row)."""
    rows = measured(stages)
    names = [[rows[p]["name"] for p in ps] for ps in parent_rows(stages)]
    by_name = {s["name"]: n for s, n in zip(rows, names)}
    return ["–" if is_reference(s) or s is rows[0] else _parents_cell(s, by_name[s["name"]]) for s in stages]


def _parents_cell(stage: Stage, shown: list[str]) -> str:
    """The recorded parents, those without a row marked "(left out)" (see the "Not comparable" section), so a
    stage whose parent was left out does not read as built from outside the run."""
    names = [p if p in shown else f"{p} (left out)" for p in stage.get("parents", shown)]
    return ", ".join(names) or "outside the run"


def scores_table(stages: list[Stage]) -> str:
    """Row x key table of "value ± stderr (delta vs base)"; the base row carries no delta, reference rows do.

    When the stages branch (``is_linear`` is false) a "from" column names each stage's parents, since the
    row order no longer says what a stage descends from; a chain reads top to bottom without it.
    """
    keys, m = score_matrix(stages)
    b = base_index(stages)
    lineage = [] if is_linear(stages) else [[c] for c in from_cells(stages)]
    rows = []
    for i, stage in enumerate(stages):
        cells = [score_cell(m[i, j], _stderr_of(stage, k), None if i == b else m[i, j] - m[b, j])
                 for j, k in enumerate(keys)]
        rows.append([stage["name"]] + (lineage[i] if lineage else []) + [_trains_on_cell(stage)] + cells)
    return md_table(["stage"] + (["from"] if lineage else []) + ["trains on"] + keys, rows)


def forgetting_table(stages: list[Stage]) -> str:
    """Stage x key table of RWalk forgetting (best earlier score minus current); base and stages only."""
    keys, _ = score_matrix(stages)
    f = forgetting(stages)
    rows = [[s["name"]] + [fmt_delta(f[i, j]) for j in range(len(keys))] for i, s in enumerate(measured(stages))]
    return md_table(["stage"] + keys, rows)


def references_note(stages: list[Stage]) -> str:
    """Why the `input:` rows are in the scores table and nowhere else; empty when there are none."""
    names = [f"`{s['name']}`" for s in stages if is_reference(s)]
    if not names:
        return ""
    return (f"Reference rows ({', '.join(names)}) are input models a stage reads without being a stage of this run "
            "(a merge's `models:`, a transfer's `source_finetuned`), evaluated with the same suite and settings and "
            "placed before the stage that reads them. Forgetting, significant drops, the summary and the eval gate "
            "are computed over the base and the stages only.")


def drops_list(drops: list[dict[str, Any]], branched: bool = False) -> str:
    """One bullet per flagged drop, or a line saying there are none. When stages branch, a drop against the
    parent (``against="previous"`` in the JSON) reads "vs parent": the row before may be a sibling."""
    if not drops:
        return "No significant drops."
    word = {"previous": "parent"} if branched else {}
    return "\n".join(f"- `{d['stage']}` {d['key']}: {fmt_delta(-d['drop'])} vs {word.get(d['against'], d['against'])} "
                     f"(`{d['reference']}`), threshold {d['threshold']:.3f}" for d in drops)


def summary_list(summary: dict[str, Any]) -> str:
    """The three headline figures as bullets."""
    md = summary["max_drop"]
    if md["drop"] is None:
        drop = NA
    elif md["stage"] is None:
        drop = "0.000 (nothing fell below base)"
    else:
        drop = f"{md['drop']:.3f} ({md['key']} after `{md['stage']}`)"
    bwt_s = _bwt_text(summary["backward_transfer"], summary.get("backward_transfer_note"))
    lines = [
        f"- Average forgetting at the last stage: {fmt_delta(summary['average_forgetting'])}",
        f"- Largest drop below base: {drop}",
        f"- Backward transfer (GEM): {bwt_s}",
    ]
    for b in summary.get("branches") or []:
        bwt = _bwt_text(b["backward_transfer"], b.get("backward_transfer_note"))
        lines.append(f"- Branch ending at `{b['stage']}`: average forgetting {fmt_delta(b['average_forgetting'])}, "
                     f"backward transfer {bwt}")
    return "\n".join(lines)


def _bwt_text(bwt: float | None, note: str | None) -> str:
    """BWT, or n/a, followed by why it is n/a or which terms it leaves out (``backward_transfer_note``)."""
    text = NA if bwt is None else fmt_delta(bwt)
    return f"{text} ({note})" if note else text


def not_comparable_section(left_out: list[dict[str, Any]]) -> str:
    """The rows ``evals.run_report.rerender_report`` left out, each with its eval.json and why; empty when none."""
    if not left_out:
        return ""
    lines = [f"- `{r['name']}` (`{r['eval']}`): {'; '.join(r['why'])}" for r in left_out]
    return ("## Not comparable\n\nLeft out of every table, figure and metric in this report: these eval.json "
            "files were made with other eval settings than pipeline.yaml's eval block, or the stage was built "
            "from an earlier version of a stage it descends from, so their scores do not compare with the rows "
            "shown. The next `posttrain run` of this pipeline re-evaluates (or retrains) them.\n\n"
            + "\n".join(lines))


def pending_section(pending: list[str]) -> str:
    """The stages a running (or stopped) pipeline has not evaluated yet; empty when none."""
    if not pending:
        return ""
    return ("## Not yet evaluated in this run\n\n" + ", ".join(f"`{n}`" for n in pending) + ": a row appears "
            "when the run reaches the stage. An eval.json an earlier attempt left in its folder is not shown, "
            "since this run may retrain the stage (`posttrain report` shows what the folders hold).")


def render_markdown(stages: list[Stage], report: dict[str, Any], z: float,
                    extra_sections: list[str] | None = None) -> str:
    """The whole ``forgetting.md``: scores, the rows left out and the stages still to come (when there are
    any: ``report["not_comparable"]``, ``report["pending"]``), forgetting, flagged drops, summary, then
    ``extra_sections``."""
    parts = [
        "# Forgetting report",
        "Scores after each stage as value ± stderr (change vs base). Higher is better.",
        scores_table(stages),
        references_note(stages),
        not_comparable_section(report.get("not_comparable") or []),
        pending_section(report.get("pending") or []),
        "## Forgetting per stage",
        "Best score among the stage's ancestors minus the current one (Chaudhry et al. 2018); positive means "
        "forgotten. The ancestors are every earlier stage in a chain, and the `from` chain back to the base when "
        "stages branch, so a stage is never measured against a sibling; changes vs previous likewise compare a "
        "stage with its first parent.",
        forgetting_table(stages),
        f"## Significant drops (z = {z:g})",
        "A drop larger than `z · sqrt(stderr_a² + stderr_b²)`; a missing stderr counts as 0.",
        drops_list(report["significant_drops"], branched=not is_linear(stages)),
        "## Summary",
        summary_list(report["summary"]),
    ]
    parts += list(extra_sections or [])
    return "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


def _lineage_segments(stages: list[Stage]) -> list[tuple[int, int, bool]]:
    """(parent row, stage row, is first parent) over all rows, for drawing each stage joined to its parents."""
    rows = [i for i, s in enumerate(stages) if not is_reference(s)]
    return [(rows[p], rows[k], n == 0) for k, ps in enumerate(parent_rows(stages)) for n, p in enumerate(ps)]


PNG_DPI = 120


def render_png(stages: list[Stage]) -> bytes:
    """``render_figure(stages)`` as PNG bytes."""
    buf = io.BytesIO()
    render_figure(stages).savefig(buf, format="png", dpi=PNG_DPI)
    return buf.getvalue()


def render_figure(stages: list[Stage]) -> Figure:
    """One line per key across the base and stages (x ticks = row names), with stderr bars; reference rows
    are unjoined hollow markers at their own ticks, since no line runs through a model outside the run. When
    stages branch, each stage is joined to its parents instead of to the row before it (dashed for a merge's
    further parents), so no line runs between siblings. Stage names are slanted when they would touch."""
    keys, m = score_matrix(stages)
    _, se = stderr_matrix(stages)
    fig = Figure(figsize=(max(6.0, 1.2 * len(stages)), 4.5), dpi=PNG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(stages))
    ref = np.array([is_reference(s) for s in stages])
    segments = [] if is_linear(stages) else _lineage_segments(stages)
    for j, key in enumerate(keys):
        line = ax.errorbar(x[~ref], m[~ref, j], yerr=se[~ref, j], marker="o", capsize=3, label=key,
                           linestyle="none" if segments else "-")
        for a, b, first in segments:
            ax.plot([a, b], [m[a, j], m[b, j]], linestyle="-" if first else "--", color=line.lines[0].get_color())
        if ref.any():
            ax.errorbar(x[ref], m[ref, j], yerr=se[ref, j], fmt="D", mfc="none", capsize=3,
                        color=line.lines[0].get_color())
    ax.set_xticks(x, [s["name"] for s in stages])
    ax.set_xlabel("stage")
    ax.set_ylabel("score")
    ax.set_title("Scores across stages")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.tight_layout()
    _fit_tick_labels(fig, ax)
    return fig


def tick_labels_overlap(fig: Figure, ax: Any) -> bool:
    """True when two neighbouring x tick labels' boxes touch (horizontal labels that run into each other)."""
    renderer = fig.canvas.get_renderer()
    boxes = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()), key=lambda b: b.x0)
    gap = 4  # pixels: labels closer than this read as one word ("sft_arithmeticsft_reversal")
    return any(a.x1 + gap > b.x0 for a, b in zip(boxes, boxes[1:]))


def _fit_tick_labels(fig: Figure, ax: Any) -> None:
    """Slant the stage names when they would run into each other; the width they need depends on the names
    and on the legend beside the axes, so it is measured on the laid-out figure, not guessed from a count."""
    if tick_labels_overlap(fig, ax):
        for label in ax.get_xticklabels():
            label.set(rotation=30, ha="right", rotation_mode="anchor")
        fig.tight_layout()


def write_report(stages: list[Stage], out_dir: str, extra_sections: list[str] | None = None,
                 z: float = 2.0, not_comparable: list[dict[str, Any]] | None = None,
                 pending: list[str] | None = None) -> dict[str, Any]:
    """Write ``forgetting.{json,md,png}`` into ``out_dir`` (created if needed); return the JSON report.

    ``extra_sections`` are markdown strings appended to ``forgetting.md`` (e.g. the HFT masks per stage).
    ``not_comparable`` (``[{"name", "eval", "why": [...]}]``: rows left out of ``stages`` because their scores
    do not compare) and ``pending`` (stage names a run has not evaluated yet) are listed in the md and, when
    not empty, kept in the JSON under the same names.
    """
    os.makedirs(out_dir, exist_ok=True)
    report = build_report(stages, z=z)
    if not_comparable:
        report["not_comparable"] = [dict(r) for r in not_comparable]
    if pending:
        report["pending"] = list(pending)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"  # allow_nan=False: strict JSON or fail
    atomic_write_bytes(os.path.join(out_dir, "forgetting.json"), text.encode())
    md = render_markdown(stages, report, z, extra_sections)
    atomic_write_bytes(os.path.join(out_dir, "forgetting.md"), md.encode())
    atomic_write_bytes(os.path.join(out_dir, "forgetting.png"), render_png(stages))
    return report
