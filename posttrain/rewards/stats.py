"""Reward failure counts of a GRPO run, by reward and error kind (posttrain.rewards fills them)."""
from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from posttrain.rewards.sandbox import ERROR_KINDS


class RewardStats:
    """Counts reward failures by reward name and error kind, so a stage can log them with its metrics."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._rows: Counter[tuple[str, bool]] = Counter()  # (reward, scored) -> completions
        self._lock = threading.Lock()  # reward calls may come from a thread pool

    def record(self, reward: str, kind: str) -> None:
        with self._lock:
            self._counts[(reward, kind)] += 1

    def rows(self, reward: str, scored: int = 0, failed: int = 0) -> None:
        """Count completions that ``reward`` scored, and those it failed on (each scored 0 instead)."""
        with self._lock:
            self._rows[(reward, True)] += scored
            self._rows[(reward, False)] += failed

    def failed_every_call(self) -> dict[str, dict[str, int]]:
        """``{reward: {kind: count}}`` for each reward that failed on every completion it was given: it
        scored none, so it gave the training no signal at all."""
        with self._lock:
            failed = [r for (r, scored), n in self._rows.items() if not scored and n and not self._rows[(r, True)]]
            return {r: {k: n for (r2, k), n in self._counts.items() if r2 == r and n} for r in failed}

    def count(self, kind: str | None = None, reward: str | None = None) -> int:
        """Failures matching ``kind`` and ``reward`` (None matches any)."""
        with self._lock:
            return sum(n for (r, k), n in self._counts.items()
                       if (kind is None or k == kind) and (reward is None or r == reward))

    def by_kind(self) -> dict[str, int]:
        """Every error kind, zero included, so logged series never have gaps."""
        return {kind: self.count(kind) for kind in ERROR_KINDS}

    def as_metrics(self, prefix: str = "rewards/errors") -> dict[str, float]:
        """``{prefix}/{kind}`` totals plus ``{prefix}/{reward}/{kind}`` for every non-zero pair."""
        out = {f"{prefix}/{kind}": float(n) for kind, n in self.by_kind().items()}
        with self._lock:
            out.update({f"{prefix}/{r}/{k}": float(n) for (r, k), n in self._counts.items()})
        return out

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._rows.clear()

    def __getstate__(self) -> dict[str, Any]:  # pickles without its lock (TRL may ship rewards to a process)
        return {"_counts": Counter(self._counts), "_rows": Counter(self._rows)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._counts, self._rows, self._lock = state["_counts"], state["_rows"], threading.Lock()
