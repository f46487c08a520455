"""Render the forgetting report of a run: ``<run-dir>/report/forgetting.{json,md,png}``, and its summary for the
terminal.

::

    <out_dir>/                 usually <run-dir>/report/
      forgetting.json          evals.summary.build_report(stages): stages as given, per-key deltas and forgetting,
                               per-stage gain and forgetting (stage_summaries), summary; "not_comparable" and
                               "pending" when write_report was given any
      forgetting.md            the base's model, the summary (headline: the last stage's largest significant
                               drop), the per-stage table (gain on trained tasks, forgetting of the others),
                               scores table (a "from" column when stages branch), the rows left out as not
                               comparable, the stages a run has still to evaluate, forgetting per key, flagged
                               drops, extra sections
      forgetting.png           evals.plot: change-vs-base heatmap beside the scores across stages

Each file is written to a temporary file in ``out_dir`` and renamed into place, so a reader never sees a
half-written report. The metrics live in ``evals.forgetting`` and ``evals.summary``; this module only formats
them, and the terminal summary (``stage_line``, ``terminal_summary``) reads the same JSON dict as the md, so
what a run prints is what forgetting.json holds.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from evals.forgetting import (Stage, base_index, forgetting, is_linear, is_reference, measured, parent_rows,
                              score_matrix, trained_columns)
from evals.plot import render_png
from evals.summary import build_report
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
        if stage.get("unmitigated_of"):
            return "trained, before mitigation"
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
        name = f"{stage['name']} ({model_name(stage)})" if i == b else stage["name"]
        rows.append([name] + (lineage[i] if lineage else []) + [_trains_on_cell(stage)] + cells)
    return md_table(["stage"] + (["from"] if lineage else []) + ["trains on"] + keys, rows)


def model_name(stage: Stage) -> str:
    """The model a row evaluated, as the config named it (``model_ref``: `world-sft`, a hub name), else its
    folder."""
    return str(stage.get("model_ref") or stage.get("model") or "?")


def forgetting_table(stages: list[Stage], summaries: list[dict[str, Any]]) -> str:
    """Stage x key table of what each stage forgot: max(0, best ancestor score - current) per key it does not
    train ("*": a significant drop), "trained" where it trains the key's task, and the row's average (the
    mean of its numbers: ``average_forgetting``). Stages after the base only; ``summaries``: their
    ``stage_summaries``."""
    keys, _ = score_matrix(stages)
    f = forgetting(stages)
    rows = []
    for k, (stage, summ) in enumerate(zip(measured(stages)[1:], summaries), start=1):
        trained, flagged = set(trained_columns(stages, k)), set(summ["significant_drops"])
        cells = ["trained" if j in trained else NA if math.isnan(f[k, j]) else
                 fmt_value(max(f[k, j], 0.0)) + ("*" if key in flagged else "") for j, key in enumerate(keys)]
        rows.append([stage["name"]] + cells + [fmt_value(summ["forgetting"])])
    return md_table(["stage"] + keys + ["average"], rows)


def references_note(stages: list[Stage]) -> str:
    """Why the `input:` rows are in the scores table and nowhere else; empty when there are none."""
    names = [f"`{s['name']}`" for s in stages if is_reference(s)]
    if not names:
        return ""
    return (f"Reference rows ({', '.join(names)}) are input models a stage reads without being a stage of this run "
            "(a merge's `models:`, a transfer's `source_finetuned`), or the trained model of a mitigated stage "
            "(`<stage>:unmitigated`), evaluated with the same suite and settings and placed before the stage they "
            "belong to. Forgetting, significant drops, the summary and the eval gate "
            "are computed over the base and the stages only.")


def drops_list(drops: list[dict[str, Any]], branched: bool = False) -> str:
    """One bullet per flagged drop, or a line saying there are none. When stages branch, a drop against the
    parent (``against="previous"`` in the JSON) reads "vs parent": the row before may be a sibling."""
    if not drops:
        return "No significant drops."
    word = {"previous": "parent"} if branched else {}
    return "\n".join(f"- `{d['stage']}` {d['key']}: {fmt_delta(-d['drop'])} vs {word.get(d['against'], d['against'])} "
                     f"(`{d['reference']}`), threshold {d['threshold']:.3f}" for d in drops)


def drop_text(d: dict[str, Any] | None, vs: bool = True) -> str:
    """ "world_facts/acc -0.760 (0.860 -> 0.100 vs `base`), significant" for a ``forgetting_drops`` record;
    "none" without one."""
    if d is None:
        return "none"
    where = f" vs `{d['reference']}`" if vs else ""
    sig = "significant" if d["significant"] else f"not significant (threshold {d['threshold']:.3f})"
    return f"{d['key']} {fmt_delta(-d['drop'])} ({fmt_value(d['before'])} -> {fmt_value(d['after'])}{where}), {sig}"


def gain_text(summ: dict[str, Any]) -> str:
    """ "+0.930 (world_arithmetic/exact_match 0.020 -> 0.950)", or why there is no gain figure."""
    if summ["gain"] is None:
        if not summ["trains_on"]:
            return f"n/a (`{summ['stage']}` names no trains_on)"
        return f"n/a (no score of {', '.join(summ['trains_on'])} at `{summ['stage']}` and its parent)"
    parts = [f"{g['key']} {fmt_value(g['before'])} -> {fmt_value(g['after'])}" for g in summ["gains"]]
    return f"{fmt_delta(summ['gain'])} ({'; '.join(parts)} vs `{summ['compared_with']}`)"


def summary_list(report: dict[str, Any]) -> str:
    """The headline first (the last stage's largest significant drop), then its average forgetting, its gain
    on the tasks it trains, side gains, the largest drop below base at any stage, BWT, and per branch end."""
    summary, per_stage = report["summary"], report.get("stage_summaries") or []
    if not per_stage:
        return "Only the base is evaluated so far: nothing to compare."
    last = per_stage[-1]
    head = summary["headline"]
    lines = [f"- **Forgetting at `{last['stage']}`: {drop_text(head)}**" if head else
             f"- Forgetting at `{last['stage']}`: no key it does not train fell below its best earlier score",
             f"- Average forgetting at `{last['stage']}`: {fmt_value(summary['average_forgetting'])} over the "
             f"{summary['forgetting_keys']} keys it does not train (drops only: a gain counts as 0)",
             f"- Average forgetting of tasks earlier stages trained: "
             f"{_or_why(summary['average_forgetting_earlier_tasks'], 'no earlier stage trains a scored task')}",
             f"- Gain on the tasks `{last['stage']}` trains: {gain_text(last)}"]
    if last["side_gains"]:
        lines.append("- Side gains (keys it does not train): " + ", ".join(
            f"{g['key']} {fmt_delta(g['change'])}" for g in last["side_gains"]))
    md = summary["max_drop"]
    drop = NA if md["drop"] is None else "0.000 (nothing fell below base)" if md["stage"] is None else (
        f"{md['drop']:.3f} ({md['key']} after `{md['stage']}`)")
    lines += [f"- Largest drop below base at any stage: {drop}",
              f"- Backward transfer (GEM): {_bwt_text(summary['backward_transfer'], summary.get('backward_transfer_note'))}"]
    for b in summary.get("branches") or []:
        bwt = _bwt_text(b["backward_transfer"], b.get("backward_transfer_note"))
        lines.append(f"- Branch ending at `{b['stage']}`: gain {fmt_delta(b['gain_on_trained'])}, average forgetting "
                     f"{fmt_value(b['average_forgetting'])}, largest drop {drop_text(b['headline'])}, "
                     f"backward transfer {bwt}")
    return "\n".join(lines)


def stage_cells(summ: dict[str, Any], limit: int | None = None) -> list[str]:
    """A stage's row of the per-stage table (the md's and the terminal's): gain on its trained tasks, average
    forgetting of the others, its largest drop, its significant drops (the first `limit` named)."""
    gain = NA if summ["gain"] is None else fmt_delta(summ["gain"])
    forgot = NA if summ["forgetting"] is None else f"{fmt_value(summ['forgetting'])} over {summ['forgetting_keys']}"
    head = summ["drops"][0] if summ["drops"] else None
    worst = "none" if head is None else (f"{head['key']} {fmt_delta(-head['drop'])}" + ("*" if head["significant"]
                                                                                        else ""))
    names = summ["significant_drops"]
    shown = names if limit is None or len(names) <= limit else names[:limit] + [f"+{len(names) - limit} more"]
    return [gain, forgot, worst, f"{len(names)}" + (f": {', '.join(shown)}" if names else "")]


STAGE_HEADER = ["gain on trained tasks", "forgetting (avg, other keys)", "worst drop", "significant drops"]


def per_stage_table(report: dict[str, Any]) -> str:
    """Per stage: what it was built from (as the scores table's "from" column), what it trains, and
    ``stage_cells``."""
    built_from = {s["name"]: c for s, c in zip(report["stages"], from_cells(report["stages"]))}
    rows = [[s["stage"], built_from[s["stage"]], ", ".join(s["trains_on"]) or "–", *stage_cells(s)]
            for s in report.get("stage_summaries") or []]
    return md_table(["stage", "from", "trains on", *STAGE_HEADER], rows)


def stage_line(summ: dict[str, Any]) -> str:
    """One line for the terminal after a stage's eval: what it gained on what it trains, what it lost."""
    gain = "no trains_on to gain on" if not summ["trains_on"] else (
        f"gained {NA if summ['gain'] is None else fmt_delta(summ['gain'])} on {', '.join(summ['trains_on'])}")
    head = summ["drops"][0] if summ["drops"] else None
    lost = "lost nothing on the other keys" if head is None else f"worst drop {drop_text(head)}"
    forgot = NA if summ["forgetting"] is None else fmt_value(summ["forgetting"])
    n = len(summ["significant_drops"])
    return (f"{gain}; {lost}; average forgetting {forgot} over {summ['forgetting_keys']} other keys, "
            f"{n} significant drop{'' if n == 1 else 's'}")


def terminal_summary(report: dict[str, Any], report_path: str | None = None) -> list[str]:
    """The lines a run prints at its end: the per-stage table (stage, gain, forgetting, worst drop,
    significant drops; "*": significant) against the base's model, then the report's path when given."""
    per_stage = report.get("stage_summaries") or []
    base = report["stages"][base_index(report["stages"])]
    lines = []
    if per_stage:
        rows = [[s["stage"], *stage_cells(s, limit=3)] for s in per_stage]
        lines += [f"summary (base: {model_name(base)}; *: significant drop):",
                  *md_table(["stage", *STAGE_HEADER], rows).splitlines()]
    return lines + ([f"report: {report_path}"] if report_path else [])


def _or_why(value: float | None, why: str) -> str:
    return fmt_value(value) if value is not None else f"{NA} ({why})"


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
    """The whole ``forgetting.md``: the base's model, the summary, the per-stage table, the figure, the scores,
    the rows left out and the stages still to come (when there are any: ``report["not_comparable"]``,
    ``report["pending"]``), forgetting per key, flagged drops, then ``extra_sections``."""
    base = stages[base_index(stages)]
    per_stage = report.get("stage_summaries") or []
    parts = [
        "# Forgetting report",
        f"Base: `{model_name(base)}`" + (f" (`{base['model']}`)" if base.get("model_ref") and base.get("model")
                                         else "") + ". Higher is better.",
        "## Summary",
        summary_list(report),
        "## Per stage" if per_stage else "",
        "Gain: the mean change on the keys of the tasks the stage trains (`trains_on`), from the model it started "
        "from. Forgetting: the mean over the other keys of how far each fell below its best score at any stage "
        "before (a gain counts as 0; Chaudhry et al. 2018). Worst drop: the largest significant one first "
        f"(`*`: larger than `{z:g} · sqrt(stderr_a² + stderr_b²)`)." if per_stage else "",
        per_stage_table(report) if per_stage else "",
        "![forgetting](forgetting.png)",
        "## Scores",
        "Value ± stderr (change vs base).",
        scores_table(stages),
        references_note(stages),
        not_comparable_section(report.get("not_comparable") or []),
        pending_section(report.get("pending") or []),
        "## Forgetting per stage" if per_stage else "",
        "Best score among the stage's ancestors minus the current one, 0 where it rose; `trained` where the stage "
        "trains the key's task. The ancestors are every earlier stage in a chain, and the `from` chain back to the "
        "base when stages branch, so a stage is never measured against a sibling." if per_stage else "",
        forgetting_table(stages, per_stage) if per_stage else "",
        f"## Significant drops (z = {z:g})",
        "Against the base and against the stage's first parent: a drop larger than "
        "`z · sqrt(stderr_a² + stderr_b²)`; a missing stderr counts as 0.",
        drops_list(report["significant_drops"], branched=not is_linear(stages)),
    ]
    parts += list(extra_sections or [])
    return "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


def write_report(stages: list[Stage], out_dir: str, extra_sections: list[str] | None = None,
                 z: float = 2.0, not_comparable: list[dict[str, Any]] | None = None,
                 pending: list[str] | None = None, extra_json: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``forgetting.{json,md,png}`` into ``out_dir`` (created if needed); return the JSON report.

    ``extra_sections`` are markdown strings appended to ``forgetting.md`` (e.g. the HFT masks per stage).
    ``extra_json``: more top-level entries of the JSON, each kept when not empty. ``not_comparable``
    (``[{"name", "eval", "why": [...]}]``: rows left out of ``stages`` because their scores
    do not compare) and ``pending`` (stage names a run has not evaluated yet) are listed in the md and, when
    not empty, kept in the JSON under the same names.
    """
    os.makedirs(out_dir, exist_ok=True)
    report = build_report(stages, z=z)
    if not_comparable:
        report["not_comparable"] = [dict(r) for r in not_comparable]
    if pending:
        report["pending"] = list(pending)
    report.update({k: v for k, v in (extra_json or {}).items() if v})  # e.g. `mitigation`, when there is one
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"  # allow_nan=False: strict JSON or fail
    atomic_write_bytes(os.path.join(out_dir, "forgetting.json"), text.encode())
    md = render_markdown(stages, report, z, extra_sections)
    atomic_write_bytes(os.path.join(out_dir, "forgetting.md"), md.encode())
    atomic_write_bytes(os.path.join(out_dir, "forgetting.png"), render_png(stages, z=z))
    return report
