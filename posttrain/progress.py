"""What a training stage prints while it trains: a compact progress line instead of the trainers' own output.

transformers' Trainer prints every log record as a Python dict and draws a tqdm bar (ProgressCallback, or
PrinterCallback with `disable_tqdm`); interleaved with posttrain's lines, the bar also swallows the line an
interrupt prints. Unless `--verbose` (POSTTRAIN_VERBOSE), ``quiet_trainer`` takes both callbacks off the
trainer, and metrics_callback (posttrain.stages.common), which writes every record to metrics.jsonl, prints
``progress_line`` at every tenth of the steps.
"""
from __future__ import annotations

import os
from typing import Any

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
