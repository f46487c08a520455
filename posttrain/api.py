"""The Python API: run a pipeline (or one stage) from a notebook and read its forgetting report.

    import posttrain as pt
    run = pt.run("configs/pipelines/two_tasks.yaml", run_dir="runs/nb")   # or a dict, as the YAML would read
    run.report.frame()          # the forgetting table as a pandas DataFrame (plain records: list(run.report))
    run.models["sft"]           # the model folder a stage wrote
    one = pt.stage("sft", model="world", data="arithmetic", trainer={"max_steps": 50}, run_dir="runs/one")

The same loader and runner as `posttrain run` (posttrain.config.load_pipeline, posttrain.pipeline.Pipeline), so
a run dir made here reruns, resumes and reports as one made by the CLI. Bad input raises ConfigError (or the
DataError/ModelError the CLI turns into exit 2) with the CLI's one-line message.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from evals.checks import check_eval_config
from posttrain.config import load_pipeline
from posttrain.pipeline import Pipeline
from posttrain.progress import library_bars_off_unless_shown
from posttrain.rundir import open_run_dir
from posttrain.schema import ConfigError, read_yaml

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class Report(list):
    """The forgetting table of a run as plain records, one per (row, score key), in the report's row order:
    ``{"stage", "key", "value", "stderr", "delta_vs_base", "delta_vs_previous", "forgetting", "reference"}``,
    the numbers of ``report/forgetting.json`` unchanged. ``.data`` is that whole file; ``.summary`` its summary."""

    def __init__(self, data: dict):
        super().__init__(_records(data))
        self.data = data
        self.summary: dict = data.get("summary", {})

    @classmethod
    def read(cls, run_dir: str | Path) -> "Report | None":
        """The report of `run_dir`, or None when it has none (evals off, or no stage evaluated yet)."""
        path = Path(run_dir) / "report" / "forgetting.json"
        return cls(json.loads(path.read_text())) if path.is_file() else None

    def frame(self):
        """The records as a pandas DataFrame (pandas is optional: ImportError names it when missing)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Report.frame() needs pandas (pip install pandas); the records are list(report)") from e
        return pd.DataFrame(list(self))


def _records(data: dict) -> list[dict]:
    out = []
    tasks = data.get("tasks", {})
    for i, row in enumerate(data.get("stages", [])):
        for key, score in row.get("scores", {}).items():
            task = tasks.get(key, {})
            out.append({"stage": row["name"], "key": key, "value": score.get("value"), "stderr": score.get("stderr"),
                        **{f: _at(task.get(f), i) for f in ("delta_vs_base", "delta_vs_previous", "forgetting")},
                        "reference": bool(row.get("reference"))})
    return out


def _at(values: Any, i: int) -> Any:
    return values[i] if isinstance(values, list) and i < len(values) else None


class Run:
    """A finished (or resumed) run: its folder, config, stage model folders and report."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        if not (self.run_dir / "pipeline.yaml").is_file():
            raise ConfigError(f"{self.run_dir}: not a run dir (no pipeline.yaml)")
        self.config: dict = read_yaml(self.run_dir / "pipeline.yaml")

    @property
    def stage_names(self) -> list[str]:
        return [s["name"] for s in self.config.get("stages", [])]

    @property
    def models(self) -> dict[str, Path]:
        """Stage name -> its finished model folder (stages not finished are left out)."""
        out = {}
        for i, name in enumerate(self.stage_names, start=1):
            folder = self.run_dir / "stages" / f"{i:02d}_{name}" / "model"
            if folder.is_dir():
                out[name] = folder
        return out

    @property
    def report(self) -> Report | None:
        """Read fresh each time: `posttrain report` or a rerun may have rewritten it."""
        return Report.read(self.run_dir)

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, stages={self.stage_names})"


def run(pipeline: str | Path | dict, run_dir: str | Path | None = None, *, sets: list[str] | None = None,
        overwrite: bool = False, log: Callable[[str], None] = print) -> Run:
    """Run a pipeline YAML (path) or dict into `run_dir` (default: runs/<time>-<name>, as the CLI), as
    `posttrain run PIPELINE [--set a.b=v ...] [--overwrite]` does; a finished run dir reruns only what changed."""
    if isinstance(pipeline, dict):
        cfg = load_pipeline(None, sets, data=pipeline)
    else:
        cfg = load_pipeline(pipeline, sets)
    return _execute(cfg, run_dir, overwrite, log)


def stage(kind: str, run_dir: str | Path | None = None, *, config: str | Path | None = None,
          eval: dict | None = None, seed: int | None = None, overwrite: bool = False,
          log: Callable[[str], None] = print, **fields: Any) -> Run:
    """Run one stage of `kind` (`posttrain stage KIND`): `fields` are the stage's keys as a stage YAML writes them
    (`model=`, `trainer={...}`), over `config` (a stage YAML) when given, else over the config class's defaults
    (see `posttrain list`); `data` may be a source name or a list of names as well as a list of blocks; `eval`
    and `seed` are the pipeline's. The stage is named after its kind."""
    base = read_yaml(config) if config else {}
    if "data" in fields:
        fields["data"] = _data_blocks(fields["data"])
    stage_cfg = _merged({**base, "kind": kind}, fields)
    pipe: dict[str, Any] = {**_pipeline_defaults(), "name": kind, "stages": [stage_cfg]}
    if eval is not None:
        pipe["eval"] = _merged(pipe.get("eval") or {}, eval)
    if seed is not None:
        pipe["seed"] = seed
    return _execute(load_pipeline(None, data=pipe), run_dir, overwrite, log)


def _execute(cfg, run_dir, overwrite: bool, log: Callable[[str], None]) -> Run:
    check_eval_config(cfg, log)  # as the CLI: the suite, max_drop keys, mitigate's needs, before anything runs
    path, created = open_run_dir(run_dir, cfg.name)
    try:
        with library_bars_off_unless_shown():
            Pipeline(cfg, path, log, overwrite=overwrite).run()
    except BaseException:
        if created is not None and not (path / "pipeline.yaml").exists():
            created.undo()  # nothing ran: leave no empty run dir behind, as the CLI does
        raise
    return Run(path)


def _data_blocks(data: Any) -> Any:
    """`"arithmetic"` or `["a.jsonl", {...}]` -> a list of data blocks (`{"source": name}`)."""
    items = [data] if isinstance(data, (str, Path)) else data
    if not isinstance(items, list):
        return data  # the config's validation names what is wrong
    return [{"source": str(d)} if isinstance(d, (str, Path)) else d for d in items]


def _merged(base: dict, over: dict) -> dict:
    """`over` on `base`, blocks merged key by key (a `trainer={...}` changes only the keys it names)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pipeline_defaults() -> dict:
    """The pipeline settings `posttrain stage` wraps a stage in (configs/default.yaml), when the checkout has it."""
    path = REPO_CONFIGS / "default.yaml"
    return read_yaml(path) if path.is_file() else {}
