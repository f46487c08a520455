"""The report's figure (change-vs-base heatmap beside the scores) and the summary a run prints: what the
terminal says must be what forgetting.json holds. Nothing here trains; evals are faked where a run is needed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.colors import to_rgba

from evals.plot import TRAINED, heatmap_cells, render_figure
from evals.report import stage_line, terminal_summary, write_report
from tests.test_forgetting import KEYS, make_stages, world_sft_rows


def test_heatmap_cells_by_hand():
    cells = heatmap_cells(make_stages())
    assert cells["stages"] == ["sft", "dpo", "grpo"] and cells["keys"] == KEYS
    # score - base, per stage (see TABLE in test_forgetting)
    assert cells["change"].tolist() == [[-0.125, 0.0, 0.375, 0.375], [0.25, -0.25, 0.25, 0.25],
                                        [-0.125, 0.25, 0.125, -0.125]]
    # chat/win has stderr 0.02 on both sides (threshold 0.057); the others none (any change is significant).
    assert cells["significant"].tolist() == [[True, False, True, True], [True, True, True, True],
                                             [True, True, True, True]]
    assert cells["trained"].tolist() == [[False, False, True, True], [True, False, False, False],
                                         [False, True, False, False]]
    # A missing score is NaN, and neither significant nor (for a stage not training it) outlined.
    rows = make_stages()
    del rows[2]["scores"]["math/em"]
    cells = heatmap_cells(rows)
    assert np.isnan(cells["change"][1, 3]) and not cells["significant"][1, 3]


def grid(n_stages: int, n_keys: int) -> list[dict]:
    """A base and `n_stages` stages over `n_keys` keys, all at 0.5 in the base; stage i takes task i % n_keys to
    0.9 and the others to 0.5 - 0.05 * (i + 1) (stderrs 0.01: threshold 0.028, every change is significant)."""
    keys = [f"task{j:02d}/acc" for j in range(n_keys)]
    rows = [{"name": "base", "model_ref": "world", "scores": {k: {"value": 0.5, "stderr": 0.01} for k in keys}}]
    for i in range(n_stages):
        scores = {k: {"value": 0.5 - 0.05 * (i + 1), "stderr": 0.01} for k in keys}
        scores[keys[i % n_keys]] = {"value": 0.9, "stderr": 0.01}
        rows.append({"name": f"stage_{i}", "trains_on": [f"task{i % n_keys:02d}"], "scores": scores})
    return rows


@pytest.mark.parametrize("n_stages,n_keys", [(2, 3), (10, 20)])
def test_heatmap_draws_every_cell_marks_and_outlines(n_stages, n_keys):
    fig = render_figure(grid(n_stages, n_keys))
    heat = fig.axes[0]
    assert heat.get_title().startswith("Change vs base (world)")
    labels = [t.get_text() for t in heat.texts]
    assert len(labels) == n_stages * n_keys
    # Stage i: its own task rose to 0.9 (+0.40), the others fell 0.05 * (i + 1); threshold 2 * sqrt(2) * 0.01.
    assert labels[0] == "+0.40*" and labels[1] == "-0.05*"
    outlines = [p for p in heat.patches if p.get_edgecolor() == pytest.approx(to_rgba(TRAINED))]
    assert len(outlines) == n_stages  # one trained cell per stage
    assert [t.get_text() for t in heat.get_yticklabels()] == [f"stage_{i}" for i in range(n_stages)]
    # Readable sizes: side by side for a few keys, stacked (never wider than 16 in) for many.
    width, height = fig.get_size_inches()
    assert width <= 16 and height <= 16
    side_by_side = fig.axes[1].get_position().x0 > heat.get_position().x1
    assert side_by_side == (n_keys <= 5)


def test_base_only_figure_has_lines_and_no_heatmap():
    fig = render_figure(make_stages()[:1])
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == ["Scores across stages"]


# ---- the terminal summary against forgetting.json ----------------------------------------------------------------


def parse_table(lines: list[str]) -> dict[str, list[str]]:
    """{stage: cells} from the pipe table in `lines` (header and rule left out)."""
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


def check_against_json(lines: list[str], report: dict) -> None:
    """Every figure the terminal table prints is forgetting.json's, to the 3 decimals it shows."""
    table = parse_table(lines)
    assert list(table) == [s["stage"] for s in report["stage_summaries"]]
    for s in report["stage_summaries"]:
        gain, forgot, worst, sig = table[s["stage"]]
        assert gain == ("n/a" if s["gain"] is None else f"{s['gain']:+.3f}")
        assert forgot == ("n/a" if s["forgetting"] is None else f"{s['forgetting']:.3f} over {s['forgetting_keys']}")
        head = s["drops"][0] if s["drops"] else None
        assert worst == ("none" if head is None else f"{head['key']} {-head['drop']:+.3f}"
                         + ("*" if head["significant"] else ""))
        names, n = s["significant_drops"], len(s["significant_drops"])
        assert int(sig.split(":")[0]) == n
        shown = [x.strip() for x in sig.split(":", 1)[1].split(",")] if ":" in sig else []
        assert shown == (names if n <= 3 else names[:3] + [f"+{n - 3} more"])


def check_run_summary(stderr: str, run_dir) -> None:
    """A CLI run's stderr holds the summary table, whose figures are its forgetting.json's, and names the
    report once (the demos' end: `make stage=<kind>`)."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("summary (base: "))
    report = json.loads((run_dir / "report" / "forgetting.json").read_text())
    assert report["stage_summaries"]
    check_against_json(lines[start:], report)
    report_lines = [line for line in lines if line.startswith("report: ")]
    assert report_lines == [f"report: {run_dir / 'report' / 'forgetting.md'}"]


def test_terminal_summary_is_forgetting_json(tmp_path):
    """The issue's sft numbers: gained 0.94 on arithmetic, lost 0.70 on facts; and a three-stage chain."""
    write_report(world_sft_rows(), str(tmp_path / "sft"))
    report = json.loads((tmp_path / "sft" / "forgetting.json").read_text())
    lines = terminal_summary(report, "runs/x/report/forgetting.md")
    assert lines[0] == "summary (base: world; *: significant drop):"
    assert parse_table(lines) == {"sft": ["+0.940", "0.175 over 4", "world_facts/acc -0.700*", "1: world_facts/acc"]}
    assert lines[-1] == "report: runs/x/report/forgetting.md"
    check_against_json(lines, report)
    assert stage_line(report["stage_summaries"][0]) == (
        "gained +0.940 on world_arithmetic; worst drop world_facts/acc -0.700 (0.860 -> 0.160 vs `base`), "
        "significant; average forgetting 0.175 over 4 other keys, 1 significant drop")

    write_report(make_stages(), str(tmp_path / "chain"))
    report = json.loads((tmp_path / "chain" / "forgetting.json").read_text())
    check_against_json(terminal_summary(report), report)
    assert terminal_summary(json.loads(json.dumps(report | {"stage_summaries": []}))) == []


def test_run_prints_each_stage_and_the_summary_once(world, tmp_path, monkeypatch):
    """In a run (evals faked): one line per stage after its eval, and at the end the table and the report's
    path, once; the figures are forgetting.json's."""
    import evals.runner
    from evals.run_report import evaluate_into_run
    from posttrain.config import load_pipeline
    from posttrain.pipeline import Pipeline

    rows = {r["name"]: r["scores"] for r in world_sft_rows()}
    monkeypatch.setattr(evals.runner, "_run_lm_eval", lambda model, *a: {"scores": rows[Path(model).name]})
    cfg = load_pipeline(None, data={"eval": {"limit": 4}, "stages": [
        {"name": "sft", "kind": "sft", "data": [{"source": "arithmetic"}]}]})
    logs: list[str] = []
    pipe = Pipeline(cfg, tmp_path / "run", logs.append)
    pipe.report = evaluate_into_run(pipe, None, "00_base", "org/base")
    pipe.parents["sft"] = ["base"]
    pipe.report = evaluate_into_run(pipe, cfg.stages[0], "01_sft", "org/sft")
    pipe._print_summary()
    report = json.loads((tmp_path / "run" / "report" / "forgetting.json").read_text())
    assert report["stages"][0]["model_ref"] == "world"
    assert [line for line in logs if line.startswith("[01 sft] ")] == [
        "[01 sft] " + stage_line(report["stage_summaries"][0])]
    assert [line for line in logs if line.startswith("report: ")] == [
        f"report: {tmp_path / 'run' / 'report' / 'forgetting.md'}"]
    check_against_json(logs[logs.index("summary (base: world; *: significant drop):"):], report)


def test_posttrain_report_prints_the_summary(tmp_path, capsys):
    """`posttrain report` on a constructed run dir of `make stage=sft`: the table on stderr, figures from the
    forgetting.json it rewrites, the md's path last on stdout; the base row names `world`."""
    from posttrain.cli import main
    from posttrain.config import load_pipeline
    from posttrain.pipeline import Pipeline
    from tests.test_evals import _key

    cfg = load_pipeline(None, data={"name": "sft", "eval": {"limit": 100}, "stages": [
        {"name": "sft", "kind": "sft", "model": "world", "data": [{"source": "arithmetic"}],
         "trains_on": ["world_arithmetic"]}]})
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.yaml").write_text(yaml.safe_dump(Pipeline(cfg, run, lambda m: None)._dump(), sort_keys=False))
    for (folder, parents), row in zip([("00_base", []), ("01_sft", ["base"])], world_sft_rows()):
        (run / "stages" / folder).mkdir(parents=True)
        (run / "stages" / folder / "eval.json").write_text(json.dumps({
            "model": row["model"], "scores": row["scores"], "parents": parents,
            "key": _key(cfg.eval, row["model"])}))
    assert main(["report", str(run)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(run / "report" / "forgetting.md")
    report = json.loads((run / "report" / "forgetting.json").read_text())
    check_against_json(err.splitlines(), report)
    assert report["summary"]["headline"]["key"] == "world_facts/acc"
    md = (run / "report" / "forgetting.md").read_text()
    assert "| base (world) " in md and md.count("**Forgetting at `sft`: world_facts/acc -0.700") == 1
