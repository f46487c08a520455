"""What a run prints about how far it is: pipeline lines at each stage, a compact line while a stage trains, and
progress bars on a terminal only.

Pipeline: ``PipelineProgress`` gives the line the pipeline prints as each stage starts and ends, with the
stages done of the total, the time since the run started and an estimate of the time left (the mean time of
the stages that ran in this run, eval included, times the stages left; unknown until one has run).

Training: transformers' Trainer prints every log record as a Python dict and draws a tqdm bar (ProgressCallback,
or PrinterCallback with `disable_tqdm`); interleaved with posttrain's lines, the bar also swallows the line an
interrupt prints. Unless `--verbose` (POSTTRAIN_VERBOSE), ``quiet_trainer`` takes both callbacks off the
trainer, and metrics_callback (posttrain.stages.common), which writes every record to metrics.jsonl, prints
``progress_line`` at every tenth of the steps.

Bars: a merge's or transfer's bar over bytes (posttrain.merging.stream) and lm-eval's bars over an eval's
requests are drawn when stderr is a terminal and left out of a log file (``terminal_only_bars``).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator

VERBOSE_ENV = "POSTTRAIN_VERBOSE"  # set by `--verbose`: the trainers print their own logs and progress bars


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_trainer(trainer: Any) -> None:
    """Take transformers' printing callbacks (a tqdm bar and every log dict, ProgressCallback or PrinterCallback)
    off `trainer` unless `--verbose`: metrics_callback writes every record to metrics.jsonl and prints a compact
    progress line instead."""
    if verbose():
        return
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cls in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cls)


def progress_line(logs: dict[str, Any], step: int, max_steps: int, elapsed: float, steps_done: int) -> str:
    """ "  train 40%: step 320/800, loss 1.016, 48s, ~1m12s left" from one trainer log record; the trainer's
    closing record (train_runtime) reads "  trained 800 steps in 121.6s, mean loss 0.561"."""
    if "train_runtime" in logs:
        loss = logs.get("train_loss")
        return f"  trained {step} steps in {float(logs['train_runtime']):.1f}s" + (
            f", mean loss {float(loss):.4g}" if isinstance(loss, (int, float)) else "")
    pct = f" {100 * step // max_steps}%" if max_steps > 0 else ""
    shown = [f"{k} {float(logs[k]):.4g}" for k in ("loss", "reward", "rewards/accuracies")
             if isinstance(logs.get(k), (int, float))]
    left = elapsed / steps_done * (max_steps - step) if steps_done > 0 and max_steps > step else None
    eta = f", ~{_duration(left)} left" if left is not None else ""
    return f"  train{pct}: step {step}/{max_steps}" + "".join(f", {x}" for x in shown) + f", {_duration(elapsed)}{eta}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class PipelineProgress:
    """The lines a pipeline prints as each stage starts and ends (`clock`: seconds, monotonic)::

        [01 sft] stage 1/3 starts: 0/3 done, 12s elapsed, time left unknown until a stage has run
        [01 sft] stage 1/3 finished in 1m40s: 1/3 done, 1m52s elapsed, ~3m20s left (1m40s a stage, mean of 1)
        [02 dpo] stage 2/3 skipped (done already): 2/3 done, 1m52s elapsed, ~1m40s left (1m40s a stage, mean of 1)

    A stage's time runs from its start line to its end line: input checks, training and its eval. The estimate
    takes every stage to cost the mean of those that ran in this run, whatever their kind (a merge takes
    seconds, a GRPO stage hours), so it is rough until the stages it has seen resemble the ones left; a skipped
    stage (done already) costs nothing and is not counted in the mean."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.ran: list[float] = []  # seconds of each stage that ran (not skipped)
        self._stage_start = self.started

    def start(self, index: int, name: str) -> str:
        self._stage_start = self.clock()
        return f"[{index:02d} {name}] stage {index}/{self.total} starts: {self._status()}"

    def end(self, index: int, name: str, skipped: bool) -> str:
        seconds = self.clock() - self._stage_start
        self.done += 1
        if not skipped:
            self.ran.append(seconds)
        what = "skipped (done already)" if skipped else f"finished in {_duration(seconds)}"
        return f"[{index:02d} {name}] stage {index}/{self.total} {what}: {self._status()}"

    def _status(self) -> str:
        """"1/3 done, 1m52s elapsed, ~3m20s left (...)": stages done, time since the run started, time left."""
        head = f"{self.done}/{self.total} done, {_duration(self.clock() - self.started)} elapsed"
        left = self.total - self.done
        if left <= 0:
            return head
        if not self.ran:
            return f"{head}, time left unknown until a stage has run"
        mean = sum(self.ran) / len(self.ran)
        return f"{head}, ~{_duration(mean * left)} left ({_duration(mean)} a stage, mean of {len(self.ran)})"


@contextlib.contextmanager
def terminal_only_bars(*modules: Any) -> Iterator[None]:
    """While inside, the tqdm bars `modules` open are drawn only when their stream (stderr) is a terminal (tqdm's
    own test, ``disable=None``): one opened with ``disable=False`` is drawn there; one opened without ``disable``
    is left off under TQDM_DISABLE, and drawn there otherwise; ``disable=True`` stays off.

    Why: lm-eval opens its request bars with ``disable=disable_tqdm or rank != 0``, False on the main process, an
    explicit argument that beats tqdm's environment defaults, so a run logged to a file got every redraw of the
    bar as another line. Its other bars (building contexts, tokenizing) pass no ``disable`` and were meant to
    follow TQDM_DISABLE (set by the CLI unless --verbose), but tqdm reads its environment once, when it is first
    imported, and torch imports it before the CLI sets the variable; it is read here at each bar instead. The
    module's name ``tqdm`` is replaced for the length of the call and put back after it."""
    swapped = [(m, m.tqdm) for m in modules if callable(getattr(m, "tqdm", None))]

    def wrap(original: Any) -> Any:
        def tqdm(*args: Any, **kwargs: Any) -> Any:
            if "disable" not in kwargs:
                kwargs["disable"] = True if os.environ.get("TQDM_DISABLE", "") not in ("", "0") else None
            elif kwargs["disable"] is False:
                kwargs["disable"] = None
            return original(*args, **kwargs)
        return tqdm

    for module, original in swapped:
        module.tqdm = wrap(original)
    try:
        yield
    finally:
        for module, original in swapped:
            module.tqdm = original


@contextlib.contextmanager
def library_bars_off_unless_shown() -> Iterator[None]:
    """While inside, the progress bars of transformers (model loading), datasets (map) and huggingface_hub are off
    unless stderr is a terminal or a notebook draws them (ipykernel): a script logging to a file got each bar's
    every redraw as text. The CLI turns them off through their environment variables before they are imported;
    a Python API caller has imported them already, so their runtime switches are used, and put back after."""
    import sys

    if verbose() or sys.stderr.isatty() or "ipykernel" in sys.modules:
        yield
        return
    import datasets.utils.logging as ds_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as tf_logging

    was = (tf_logging.is_progress_bar_enabled(), ds_logging.is_progress_bar_enabled(),
           not hub_utils.are_progress_bars_disabled())
    tf_logging.disable_progress_bar()
    ds_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        for on, enable in zip(was, (tf_logging.enable_progress_bar, ds_logging.enable_progress_bar,
                                    hub_utils.enable_progress_bars)):
            if on:
                enable()
