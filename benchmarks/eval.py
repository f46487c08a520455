"""Eval figure: the world suite through `posttrain eval` over the `lm_eval` command line on the same rendered task
YAMLs, model folder, limit, batch size, generation length, chat template and seeds (goal <= 1.05).

Both sides are whole commands (interpreter start and imports included). The scores of each pair are compared
too; `detail.same_scores` says whether the two sides agreed to the last digit (`detail.different`: where not).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.common import Figure, bench_env, paired, python, ratio_figure, timed


def figure(limit: int, runs: int) -> Figure:
    from evals.runner import load_suite, render_world_tasks
    from evals.config import EvalConfig
    from posttrain.models import resolve_model

    quiet = lambda m: None  # noqa: E731
    model = resolve_model("world", quiet)
    include, _ = render_world_tasks(quiet)
    suite, settings = load_suite("world"), EvalConfig()
    env = bench_env()
    differ: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as d:
        tmp = Path(d)
        lm_eval = str(Path(python()).parent / "lm_eval")
        ours_cmd = [python(), "-m", "posttrain", "eval", model, "--suite", "world", "--limit", str(limit),
                    "--out", str(tmp / "ours.json")]
        raw_cmd = [lm_eval, "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--device", "cpu",
                   "--tasks", ",".join(suite.tasks), "--include_path", str(include), "--limit", str(limit),
                   "--batch_size", str(settings.batch_size), "--gen_kwargs", f"max_gen_toks={settings.max_new_tokens}",
                   "--seed", str(settings.seed), "--output_path", str(tmp / "cli")]
        if suite.apply_chat_template:
            raw_cmd.append("--apply_chat_template")

        def ours() -> float:
            (tmp / "ours.json").unlink(missing_ok=True)  # or the next run would reuse it
            return timed(ours_cmd, env)[0]

        def raw() -> float:
            seconds = timed(raw_cmd, env)[0]
            differ.extend(_different_scores(tmp / "ours.json", tmp / "cli"))
            return seconds

        ours_s, raw_s = paired(ours, raw, runs)
    return ratio_figure("eval: world suite vs lm_eval CLI", ours_s, raw_s, 1.05,
                        f"{len(suite.tasks)} tasks, limit {limit}",
                        {"same_scores": not differ, "different": sorted(set(differ))})


def _different_scores(ours_json: Path, cli_dir: Path) -> list[str]:
    """The "task/metric,filter" entries where our eval.json and the CLI's newest results file disagree."""
    if not ours_json.is_file():
        return ["(no eval.json)"]
    ours = json.loads(ours_json.read_text())["lm_eval"]["results"]
    newest = max(cli_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    theirs = json.loads(newest.read_text())["results"]
    keys = [(t, k) for t, m in ours.items() for k in m if "," in k and isinstance(m[k], (int, float))]
    return [f"{t}/{k}" for t, k in keys if theirs.get(t, {}).get(k) != ours[t][k]]
