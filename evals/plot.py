"""The report's figure, ``<run-dir>/report/forgetting.png``: two panels drawn from the same rows as the md.

- "Change vs base": a stage x key heatmap of score minus the base's, drops in red and gains in blue on one
  scale centred at 0, each cell labelled with its change, a "*" where the change is significant (the z-test
  of evals.forgetting, against the base) and an amber outline where the stage trains the key's task
  (``trains_on``). Stages only: reference rows are in the md's scores table.
- "Scores across stages": one line per key across the base and the stages, with stderr bars. Lines that
  share values (several tasks at 0) would hide one another, so each key gets its own marker and dash and a
  small sideways offset; a ringed marker is a stage that trains that key's task.

The panels sit side by side, or one above the other when side by side would be wider than a screen (many
keys or stages); sizes follow the number of stages and keys, so 2 stages x 3 keys and 10 x 20 both read.
Matplotlib's Figure API with an explicit Agg canvas renders headless without pyplot, so importing this never
switches the caller's backend (a notebook, say) and leaves no global figures open.
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from evals.forgetting import (Stage, base_index, is_linear, is_reference, parent_rows, score_matrix, stderr_matrix,
                              task_of)

PNG_DPI = 120
MAX_WIDTH_IN = 16.0  # wider than this side by side: stack the panels
MARKERS = "osD^vP*Xh<>p"
DASHES = ["-", "--", "-.", ":"]
DROP_GAIN = "RdBu"  # red below 0 (a drop), blue above (a gain)
TRAINED = "#f0a000"  # the outline of a trained cell: a colour RdBu does not use


def render_png(stages: list[Stage], z: float = 2.0) -> bytes:
    """``render_figure(stages, z)`` as PNG bytes."""
    buf = io.BytesIO()
    render_figure(stages, z).savefig(buf, format="png", dpi=PNG_DPI)
    return buf.getvalue()


def _heatmap_rows(stages: list[Stage]) -> list[int]:
    """Rows of `stages` the heatmap shows: the measured stages after the base."""
    b = base_index(stages)
    return [i for i, s in enumerate(stages) if i != b and not is_reference(s)]


def render_figure(stages: list[Stage], z: float = 2.0) -> Figure:
    """The heatmap and the lines (see the module docstring); ``fig.axes``: heatmap, lines, colorbar (the
    heatmap and colorbar are left out when no stage follows the base)."""
    keys, _ = score_matrix(stages)
    shown = _heatmap_rows(stages)
    long_key = max((len(k) for k in keys), default=4)
    label_in = 0.075 * min(long_key, 40)  # room for the slanted key names under the heatmap
    heat_w, heat_h = 2.2 + 0.6 * max(len(keys), 2) + 1.0, 1.3 + 0.45 * max(len(shown), 1) + label_in
    line_w, line_h = max(5.0, 1.0 * len(stages)) + 2.6, 4.6
    if not shown:
        width, height, grid = line_w, line_h, None
    elif heat_w + line_w <= MAX_WIDTH_IN:
        width, height, grid = heat_w + line_w, max(heat_h, line_h), (1, 2)
    else:
        width, height, grid = max(heat_w, line_w), heat_h + line_h, (2, 1)
    fig = Figure(figsize=(width, height), dpi=PNG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if grid is None:
        _draw_lines(fig.add_subplot(), stages)
        return _fitted(fig, fig.axes[0])
    ratios = {"width_ratios": [heat_w, line_w]} if grid == (1, 2) else {"height_ratios": [heat_h, line_h]}
    heat_ax, line_ax = fig.subplots(*grid, gridspec_kw=ratios)
    _draw_heatmap(fig, heat_ax, stages, z)
    _draw_lines(line_ax, stages)
    return _fitted(fig, line_ax)


def _significant(stages: list[Stage], z: float) -> np.ndarray:
    """(n_rows, n_keys) bool: |score - base score| > z * sqrt(se_base^2 + se^2); a missing stderr counts as 0."""
    _, m = score_matrix(stages)
    _, se = stderr_matrix(stages)
    b = base_index(stages)
    with np.errstate(invalid="ignore"):
        return np.abs(m - m[b]) > z * np.sqrt(se ** 2 + se[b] ** 2)


def trained_mask(stages: list[Stage]) -> np.ndarray:
    """(n_rows, n_keys) bool: the row's ``trains_on`` names the key's task."""
    keys, _ = score_matrix(stages)
    return np.array([[task_of(k) in (s.get("trains_on") or []) for k in keys] for s in stages], dtype=bool)


def heatmap_cells(stages: list[Stage], z: float = 2.0) -> dict[str, Any]:
    """What the heatmap draws, for the tests and the figure alike: ``{"stages": row names, "keys",
    "change": (n, k) score minus base (NaN: missing), "significant": (n, k), "trained": (n, k)}``."""
    keys, m = score_matrix(stages)
    rows = _heatmap_rows(stages)
    change = m - m[base_index(stages)]
    return {"stages": [stages[i]["name"] for i in rows], "keys": keys, "change": change[rows],
            "significant": _significant(stages, z)[rows], "trained": trained_mask(stages)[rows]}


def _draw_heatmap(fig: Figure, ax: Any, stages: list[Stage], z: float) -> None:
    cells = heatmap_cells(stages, z)
    change = cells["change"]
    n, k = change.shape
    finite = np.abs(change[~np.isnan(change)])
    top = max(0.05, float(finite.max()) if finite.size else 0.0)
    image = ax.imshow(np.ma.masked_invalid(change), cmap=_cmap(), norm=Normalize(-top, top), aspect="auto")
    small = k > 12 or n > 8
    for i in range(n):
        for j in range(k):
            value = change[i, j]
            if math.isnan(value):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=6 if small else 7, color="0.35")
                continue
            text = f"{value:+.2f}" + ("*" if cells["significant"][i, j] else "")
            dark = abs(value) > 0.6 * top
            ax.text(j, i, text, ha="center", va="center", fontsize=6 if small else 8,
                    color="white" if dark else "black", fontweight="bold" if cells["significant"][i, j] else None)
            if cells["trained"][i, j]:
                # Inset so that neighbouring outlines stay apart; amber shows on dark red, dark blue and white.
                ax.add_patch(Rectangle((j - 0.44, i - 0.44), 0.88, 0.88, fill=False, edgecolor=TRAINED,
                                       linewidth=2.5))
    ax.set_xticks(range(k), cells["keys"], rotation=35 if k <= 12 else 60, ha="right", rotation_mode="anchor",
                  fontsize="small" if small else None)
    ax.set_yticks(range(n), cells["stages"], fontsize="small" if small else None)
    ax.set_xticks(np.arange(-0.5, k), minor=True)
    ax.set_yticks(np.arange(-0.5, n), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    base = stages[base_index(stages)]
    # Short lines: constrained layout keeps a title inside the figure only as wide as the axes it tops.
    ax.set_title(f"Change vs base ({base.get('model_ref') or base['name']})\nred: drop, blue: gain\n"
                 f"*: significant (z = {z:g}), amber: trained", fontsize="medium")
    fig.colorbar(image, ax=ax, shrink=0.8, label="score - base")


def _cmap() -> Any:
    from matplotlib import colormaps

    return colormaps[DROP_GAIN].with_extremes(bad="0.88")  # missing scores: light grey, labelled n/a


def _lineage_segments(stages: list[Stage]) -> list[tuple[int, int, bool]]:
    """(parent row, stage row, is first parent) over all rows, for drawing each stage joined to its parents."""
    rows = [i for i, s in enumerate(stages) if not is_reference(s)]
    return [(rows[p], rows[k], n == 0) for k, ps in enumerate(parent_rows(stages)) for n, p in enumerate(ps)]


def _draw_lines(ax: Any, stages: list[Stage]) -> None:
    """One line per key across the base and stages (x ticks = row names), with stderr bars; reference rows are
    unjoined hollow markers at their own ticks, since no line runs through a model outside the run. When
    stages branch, each stage is joined to its parents instead of to the row before it (dashed for a merge's
    further parents), so no line runs between siblings."""
    keys, m = score_matrix(stages)
    _, se = stderr_matrix(stages)
    trained = trained_mask(stages)
    x = np.arange(len(stages), dtype=float)
    ref = np.array([is_reference(s) for s in stages])
    segments = [] if is_linear(stages) else _lineage_segments(stages)
    spread = min(0.3, 0.04 * len(keys))  # sideways offsets in tick units, so equal values stay apart
    for j, key in enumerate(keys):
        dx = (j / max(len(keys) - 1, 1) - 0.5) * spread if len(keys) > 1 else 0.0
        xs, marker, dash = x + dx, MARKERS[j % len(MARKERS)], DASHES[j % len(DASHES)]
        # Earlier keys are drawn wider, so a later line on the same values leaves them showing at its edges.
        width = 1.0 + 2.0 * (len(keys) - 1 - j) / max(len(keys) - 1, 1)
        line = ax.errorbar(xs[~ref], m[~ref, j], yerr=se[~ref, j], marker=marker, markersize=5, capsize=2,
                           label=key, linestyle="none" if segments else dash, linewidth=width)
        color = line.lines[0].get_color()
        for a, b, first in segments:
            ax.plot([xs[a], xs[b]], [m[a, j], m[b, j]], linestyle=dash if first else ":", color=color, linewidth=width)
        ring = trained[:, j] & ~ref
        if ring.any():
            ax.plot(xs[ring], m[ring, j], linestyle="none", marker=marker, markersize=11, mfc="none",
                    mec="black", mew=1.3)
        if ref.any():
            ax.errorbar(xs[ref], m[ref, j], yerr=se[ref, j], fmt=marker, mfc="none", capsize=2, color=color)
    ax.set_xticks(x, [s["name"] for s in stages])
    ax.set_xlabel("stage")
    ax.set_ylabel("score")
    ax.set_title("Scores across stages\n(ringed: the stage trains that task)", fontsize="medium")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small" if len(keys) <= 12 else "x-small")


def tick_labels_overlap(fig: Figure, ax: Any) -> bool:
    """True when two neighbouring x tick labels' boxes touch (horizontal labels that run into each other)."""
    renderer = fig.canvas.get_renderer()
    boxes = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()), key=lambda b: b.x0)
    gap = 4  # pixels: labels closer than this read as one word ("sft_arithmeticsft_reversal")
    return any(a.x1 + gap > b.x0 for a, b in zip(boxes, boxes[1:]))


def _fitted(fig: Figure, ax: Any) -> Figure:
    """Slant the stage names when they would run into each other; the width they need depends on the names
    and on the legend beside the axes, so it is measured on the laid-out figure, not guessed from a count."""
    fig.canvas.draw()  # constrained layout places the axes at draw time
    if tick_labels_overlap(fig, ax):
        for label in ax.get_xticklabels():
            label.set(rotation=30, ha="right", rotation_mode="anchor")
        fig.canvas.draw()
    return fig
