"""Evals cached by content, across run dirs: the same model files scored with the same settings are scored once.

A run's eval.json is reused within its own run dir (evals.runner compares its `key`); this cache reuses it
from any run. Every `make stage=dpo` starts from `world-sft` and every `make stage=sft` from `world`, so
without it each run spent 25-50 s on 2 CPU cores re-scoring a base whose files had not changed.

The address of an eval is the sha256 of what decides its scores: the eval key (sha256 of every file of the
model folder, the suite and its tasks, the world tasks' hashes, which name the world's version, limit, seed,
few-shot, generation length, split, backend), the batch size (batched generation pads, and padding can move
a greedy answer), the package versions (lm-eval, transformers, torch, posttrain, vllm) and FORMAT::

    $POSTTRAIN_EVAL_CACHE (default: <POSTTRAIN_CACHE>/evals)/<2 hex>/<64 hex>.json   one eval record

A model named on the hub (no local folder) is never cached: its name does not say what its files hold.
POSTTRAIN_EVAL_CACHE=off turns the cache off (the test suite does, so stubbed evals are never stored, and the
benchmarks do, so they time evals rather than cache reads).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from posttrain.rundir import atomic_write_json, sha256_json
from posttrain.world import cache_root

ENV = "POSTTRAIN_EVAL_CACHE"
FORMAT = 1  # bump when an eval record's meaning changes (how scores are read from lm-eval's results)


def cache_dir() -> Path | None:
    """Where cached evals live; None when POSTTRAIN_EVAL_CACHE is "off" (or "0", "false", "no")."""
    value = os.environ.get(ENV, "")
    if value.strip().lower() in ("off", "0", "false", "no"):
        return None
    return Path(value) if value else cache_root() / "evals"


def address(key: dict[str, Any], batch_size: int, versions: dict[str, str]) -> str | None:
    """The eval's content address (64 hex), or None when the model is a hub name not pinned to a commit (`key`'s
    model_sha256 is then "hub:<name>"; a hub snapshot's "hub:<name>@<commit>" names its content)."""
    model = str(key.get("model_sha256", ""))
    if model.startswith("hub:") and "@" not in model:
        return None
    return sha256_json({"format": FORMAT, "key": key, "batch_size": batch_size, "versions": versions})


def _path(root: Path, addr: str) -> Path:
    return root / addr[:2] / f"{addr}.json"


def lookup(addr: str | None) -> tuple[dict[str, Any], Path] | None:
    """(the cached record, its file) at `addr`, or None (no cache, no entry, or an unreadable one)."""
    root = cache_dir()
    if root is None or addr is None:
        return None
    path = _path(root, addr)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (record, path) if isinstance(record, dict) and isinstance(record.get("scores"), dict) else None


def store(addr: str | None, record: dict[str, Any]) -> None:
    """Keep `record` at `addr` (atomically, so a reader sees all of it or none). A cache that cannot be
    written (a read-only home) costs a re-eval later, never the run."""
    root = cache_dir()
    if root is None or addr is None:
        return
    try:
        atomic_write_json(_path(root, addr), record)
    except OSError:
        pass
