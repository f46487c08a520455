"""What the world build prints while it runs: numbered steps, and a progress line with an ETA while it trains.

The first `make stage=<kind>` builds the world (about 2-4 minutes on 2 CPU cores) before anything else
happens; without these lines the terminal showed a tqdm bar and transformers' log dicts, or nothing. The
progress lines are the stages' (posttrain.progress.progress_line), printed at every tenth of the steps.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from posttrain.progress import progress_line, quiet_trainer


class Steps:
    """`step("tokenizer")` logs "world: step 2/3: tokenizer (~5s)" and, at the next step or `done()`, how long
    the previous one took. `expected` is seconds per step as measured on 2 CPU cores (an estimate, said so)."""

    def __init__(self, prefix: str, expected: dict[str, float], log: Callable[[str], None] = print):
        self.prefix, self.expected, self.log = prefix, expected, log
        self.names = list(expected)
        self.current: str | None = None
        self.began = self.start = time.monotonic()

    def step(self, name: str) -> None:
        self._close()
        left = sum(self.expected[n] for n in self.names[self.names.index(name):])
        self.log(f"{self.prefix}: step {self.names.index(name) + 1}/{len(self.names)}: {name} "
                 f"(about {_eta(left)} left in all on 2 CPU cores)")
        self.current, self.start = name, time.monotonic()

    def done(self) -> None:
        self._close()
        self.current = None

    def _close(self) -> None:
        if self.current is not None:
            self.log(f"{self.prefix}: {self.current} done in {_eta(time.monotonic() - self.start)}")


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def train_with_progress(trainer: Any, log: Callable[[str], None]) -> Any:
    """`trainer.train()` with a progress line at every tenth of the steps instead of the trainer's tqdm bar and
    log dicts (those stay with `--verbose`)."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.began, self.tenth = time.monotonic(), 0

        def on_step_end(self, args, state, control, **kw):
            tenth = 10 * state.global_step // max(state.max_steps, 1)
            if tenth > self.tenth and state.global_step < state.max_steps:
                self.tenth = tenth
                loss = next((r["loss"] for r in reversed(state.log_history) if "loss" in r), None)
                elapsed = time.monotonic() - self.began
                log(progress_line({} if loss is None else {"loss": loss}, state.global_step, state.max_steps,
                                  elapsed, state.global_step))

        def on_train_end(self, args, state, control, **kw):
            log(f"  trained {state.global_step} steps in {_eta(time.monotonic() - self.began)}")

    quiet_trainer(trainer)
    trainer.add_callback(_Progress())
    return trainer.train()
