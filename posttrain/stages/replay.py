"""The rows a stage's `replay:` entries mix into its own (posttrain.mixture says what replay is and why).

Shared by every kind that takes `replay:` (sft, dpo, kto, orpo, simpo, reward, grpo, rloo): each entry's pool is the earlier stage's `data:`
read as that stage read it (its limits and sampling, the same seed), then sampled with the entry's share.
"""
from __future__ import annotations

from typing import Callable

from posttrain.data import DataError, load_sources
from posttrain.mixture import Replay, sample_rows


def replay_rows(replays: list[Replay], shape: str, log: Callable[[str], None], seed: int) -> tuple[list[dict], list[dict]]:
    """(rows, stats) of every `replay:` entry, in order: rows of `shape` checked by posttrain.data, and one stats
    record per entry (source `replay:<stage>`) beside the stage's own sources' stats."""
    out: list[dict] = []
    stats: list[dict] = []
    for r in replays:
        if not r.sources():  # a stage config validated outside its pipeline: replaying nothing would be silent
            raise DataError(f"replay from {r.from_!r}: the stage was not loaded as part of its pipeline")
        pool, _ = load_sources(r.sources(), shape, lambda m: None, seed)  # the earlier stage's rows, as it read them
        rows = sample_rows(pool, r.fraction, r.rows, seed, f"replay:{r.from_}")
        log(f"data: replaying {len(rows):,} of {len(pool):,} rows of stage {r.from_}")
        stats.append({"source": f"replay:{r.from_}", "rows": len(rows), "bad_rows": 0, "bad_examples": []})
        out += rows
    return out, stats
