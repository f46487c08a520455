"""lm-eval's results turned into posttrain's score records: `{"<task>/<metric>": {"value", "stderr"}}` for the
report, and each example's score (`eval.log_samples`) for paired tests between models."""
from __future__ import annotations

from typing import Any


def scores_from_results(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's {"task": {"metric,filter": v, "metric_stderr,filter": se}} -> {"task/metric": {value, stderr}}."""
    scores = {}
    for task, metrics in results.get("results", {}).items():
        keys = [k for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
        for key in keys:
            value = metrics[key]
            metric, flt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            # A metric under one filter is named plainly; several filters of one metric keep "@filter".
            alone = sum(k.split(",", 1)[0] == metric for k in keys) == 1
            name = f"{task}/{metric}" if alone else f"{task}/{metric}@{flt}"
            scores[name] = {"value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return scores


def items_from_samples(samples: dict[str, list[dict]], scores: dict) -> dict[str, dict[str, list]]:
    """lm-eval's logged samples -> {"<task>/<metric>": {"doc_id": [...], "values": [...]}}, named as in `scores`
    (`scores_from_results`), sorted by doc_id: each example's score, so two models' evals pair item by item.
    Prompts and replies are not kept (they are lm-eval's `--log_samples` files' job, and large)."""
    out: dict[str, dict[str, list]] = {}
    for task, examples in samples.items():
        for ex in sorted(examples, key=lambda e: e["doc_id"]):
            for metric in ex.get("metrics", []):
                name = next((n for n in (f"{task}/{metric}", f"{task}/{metric}@{ex.get('filter')}") if n in scores),
                            None)
                if name is None or not isinstance(ex.get(metric), (int, float)):
                    continue
                slot = out.setdefault(name, {"doc_id": [], "values": []})
                slot["doc_id"].append(ex["doc_id"])
                slot["values"].append(float(ex[metric]))
    return out
