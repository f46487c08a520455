"""Experiment tracking: which trackers a run reports to, and what posttrain logs to them beside TRL's metrics.

`report_to:` names transformers' integrations (`tensorboard`, `wandb`, `mlflow`, `trackio`, ...); TRL's
trainer logs the training metrics to them, one tracker run per stage named `<pipeline>/<stage>`. After each
eval this module logs the stage's scores, and after the last stage the forgetting matrix and BWT, to
tensorboard through a SummaryWriter in the run dir. The layout, with tensorboard pointed at the run dir::

    <run-dir>/tensorboard/                  eval scores (eval/<key>, step = stage index), the report
    <run-dir>/stages/NN_<stage>/tensorboard/  that stage's training metrics (TRL's TensorBoardCallback)

wandb: the training run of each stage is TRL's (`<pipeline>/<stage>`, grouped by the run dir's name); each eval is
a run of its own in the same group (`<pipeline>/<row>`, job type `eval`, the scores as eval/<key> in its summary),
and the report one more (`<pipeline>/report`, job type `report`: BWT, average forgetting and the forgetting
matrix as a table). Other trackers get TRL's training metrics only.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import netrc
import os
import shutil
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from posttrain.ranks import is_main
from posttrain.registry import did_you_mean

# The module each integration imports and the pip package that provides it, where the names differ from the
# integration's own name. tensorboard: transformers falls back to tensorboardX when torch's writer is missing.
_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "azure_ml": ("azureml", "azureml-sdk"),
            "flyte": ("flytekit", "flytekit"), "codecarbon": ("codecarbon", "codecarbon"),
            "clearml": ("clearml", "clearml"), "comet_ml": ("comet_ml", "comet-ml")}


def known_trackers() -> list[str]:
    """The integrations transformers can report to (its INTEGRATION_TO_CALLBACK names)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return sorted(INTEGRATION_TO_CALLBACK)


def check_report_to(value: Any) -> list[str]:
    """`report_to:` as a list of tracker names ([] for `none`); a ValueError (one line) for an unknown name,
    `all` (it would depend on what is installed), or a tracker whose package is not installed."""
    names = [value] if isinstance(value, str) else list(value or [])
    if names in (["none"], []):
        return []
    known = known_trackers()
    for name in names:
        if name in ("none", "all"):
            raise ValueError(f"'{name}' cannot be combined with trackers; list them instead"
                             if name == "none" else "'all' is not allowed: list the trackers to report to")
        if name not in known:
            raise ValueError(f"unknown tracker '{name}'{did_you_mean(name, known)}; known: {', '.join(known)}")
        module, package = _MODULES.get(name, (name, name))
        if importlib.util.find_spec(module) is None and not (name == "tensorboard"
                                                             and importlib.util.find_spec("tensorboardX")):
            raise ValueError(f"tracker '{name}' needs its package: pip install {package}")
    return list(dict.fromkeys(names))


def wandb_problem() -> str | None:
    """Why wandb would refuse its first run here, or None: it is online (WANDB_MODE not offline/disabled) and no
    credentials are found where wandb.init looks (WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE, then the netrc entry
    of its host, then an `api_key` in its settings files). Without them wandb.init fails in a non-interactive run,
    or waits at a login prompt in a terminal, at the first stage, after the base eval: the pipeline asks this before
    the run (pipeline.check_services). Read by hand, not by wandb's own lookup: that is private API (wbauth)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    try:
        if netrc.netrc(os.path.expanduser(os.environ.get("NETRC") or "~/.netrc")).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    for settings in (config_dir / "settings", Path("wandb") / "settings"):
        with contextlib.suppress(OSError):
            if any(line.split("=")[0].strip() == "api_key" for line in settings.read_text().splitlines()):
                return None
    return (f"report_to: wandb has no credentials for {host} here: run `wandb login`, set WANDB_API_KEY, or set "
            "WANDB_MODE=offline to log locally (`wandb sync` uploads later)")


@contextlib.contextmanager
def trainer_env(report_to: list[str], stage_dir: Path, run_dir: Path, run_name: str = "") -> Iterator[None]:
    """What transformers' callbacks need while the trainer is built and trains: tensorboard's log folder
    (transformers 5 dropped TrainingArguments.logging_dir) under the stage's folder, in the environment (restored
    afterwards); for wandb, the stage's run itself, started here in the run dir's group and folder: the
    callback logs into a run that is already active, and wandb reads its environment (a folder, a group) only
    once per process, so setting those per stage would be ignored from the second run on."""
    env = {}
    if "tensorboard" in report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(stage_dir / "tensorboard")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    run = None
    try:
        if "wandb" in report_to and is_main():
            run = _wandb_init(run_dir, run_name or stage_dir.name, "train")
        yield
    finally:
        if run is not None:
            run.finish()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reset(run_dir: Path) -> None:
    """Empty the run dir's tensorboard folder at the start of a run: a run logs every eval again (reused or not)
    and the report, so what an earlier run logged would only repeat each point."""
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


def _writer(run_dir: Path):
    try:  # as transformers' TensorBoardCallback: torch's writer needs the tensorboard package, else tensorboardX
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _wandb_init(run_dir: Path, name: str, job_type: str):
    """A wandb run in the run dir's group, kept in the run dir (or $WANDB_DIR); the one before it is finished."""
    import wandb

    return wandb.init(group=run_dir.name, name=name, job_type=job_type, dir=os.environ.get("WANDB_DIR") or str(run_dir),
                      reinit="finish_previous")


def _wandb_run(run_dir: Path, name: str, job_type: str, values: dict[str, Any], table: Any = None) -> None:
    """One finished wandb run in the run dir's group holding `values` (and `table` as report/forgetting)."""
    run = _wandb_init(run_dir, name, job_type)
    try:
        if table is not None:
            run.log({"report/forgetting": table})
        run.log(values)
        run.summary.update(values)
    finally:
        run.finish()


def log_eval(report_to: list[str], run_dir: Path, stage_index: int, scores: dict[str, Any], name: str = "") -> None:
    """Log one model's eval scores (`{key: {"value", "stderr"}}`) as eval/<key> at step = its stage index (0:
    the base); `name`: the tracker run's (`<pipeline>/<row>`)."""
    if "wandb" in report_to:
        values = {f"eval/{k}": float(s["value"]) for k, s in sorted(scores.items())
                  if isinstance(s, dict) and _finite(s.get("value"))}
        _wandb_run(run_dir, name or f"eval-{stage_index:02d}", "eval", {**values, "stage_index": stage_index})
    if "tensorboard" not in report_to:
        return
    with contextlib.closing(_writer(run_dir)) as w:
        for key, score in sorted(scores.items()):
            value = score.get("value") if isinstance(score, dict) else score
            if _finite(value):
                w.add_scalar(f"eval/{key}", float(value), stage_index)


def log_report(report_to: list[str], run_dir: Path, report: dict, name: str = "report") -> None:
    """Log the forgetting report: per key, the forgetting of each stage row (report/forgetting/<key>, step = the
    row), BWT and average forgetting (report/bwt, report/average_forgetting, step = rows), and the markdown
    report as text."""
    if "wandb" in report_to:
        _log_report_wandb(run_dir, report, name)
    if "tensorboard" not in report_to:
        return
    rows = len(report.get("stages", []))
    with contextlib.closing(_writer(run_dir)) as w:
        for key, per in sorted(report.get("tasks", {}).items()):
            for kind in ("forgetting", "delta_vs_base"):
                for row, value in enumerate(per.get(kind) or []):
                    if _finite(value):
                        w.add_scalar(f"report/{kind}/{key}", float(value), row)
        summary = report.get("summary", {})
        for name, field in (("bwt", "backward_transfer"), ("average_forgetting", "average_forgetting")):
            if _finite(summary.get(field)):
                w.add_scalar(f"report/{name}", float(summary[field]), rows)
        md = run_dir / "report" / "forgetting.md"
        if md.is_file():
            w.add_text("report/forgetting", md.read_text(), rows)


def _log_report_wandb(run_dir: Path, report: dict, name: str) -> None:
    """The report as one wandb run: BWT and average forgetting, and the forgetting matrix (row x key) as a table."""
    import wandb

    summary = report.get("summary", {})
    values = {f"report/{short}": float(summary[field]) for short, field in
              (("bwt", "backward_transfer"), ("average_forgetting", "average_forgetting")) if _finite(summary.get(field))}
    keys = sorted(report.get("tasks", {}))
    rows = [s.get("name") for s in report.get("stages", [])]
    data = [[row, *[(report["tasks"][k].get("forgetting") or [None] * len(rows))[i] for k in keys]]
            for i, row in enumerate(rows)]
    _wandb_run(run_dir, name, "report", values, wandb.Table(columns=["stage", *keys], data=data))
