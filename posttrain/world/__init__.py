"""The embedded default world: tokenizer, tiny base model and task data, built locally on first use.

No hub is reachable on the machines this project targets, so the world is generated deterministically and
cached under `$POSTTRAIN_CACHE` (default `~/.cache/posttrain`), in a folder keyed by the generator's version:

    <cache>/world-<VERSION>/
      world.json               manifest: version, seed, row counts, pretraining stats
      base/                    HF folder of the tiny Llama base, tokenizer with chat template
      data/<task>/{train,dev,test}.jsonl

Two processes that build at once are safe: the builder holds a file lock, builds into a temporary folder and
renames it into place; the waiter finds the finished folder when it gets the lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from posttrain.registry import WORLD_MODELS, did_you_mean
from posttrain.world.build import build_world
from posttrain.world.tasks import TASKS

# Bump when anything that changes the generated world changes (data, tokenizer, model shape, pretraining).
VERSION = "3"


class NotBuilt(RuntimeError):
    """Raised inside `only_built()` where a world part would be built: the checks made before a run look at
    what is already cached and leave the rest to be checked once it is built."""


_ONLY_BUILT: list[bool] = []


@contextlib.contextmanager
def only_built() -> Iterator[None]:
    """Within this block, asking for a world part that is not cached raises NotBuilt instead of building it."""
    _ONLY_BUILT.append(True)
    try:
        yield
    finally:
        _ONLY_BUILT.pop()


def refuse_build(key: str) -> None:
    """NotBuilt inside `only_built()`; called where a world part is about to be built."""
    if _ONLY_BUILT:
        raise NotBuilt(key)


def wait_for_lock(lock, waiting: str, log: Callable[[str], None]) -> None:
    """Take `lock` (an open file) exclusively; when another process holds it, say so first (`waiting`), so a
    first run that waits on another's world build is not silent for minutes."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(waiting)
        fcntl.flock(lock, fcntl.LOCK_EX)


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def _cached(key: str, build: Callable[[Path], dict], log: Callable[[str], None] = print) -> Path:
    """Return <cache>/<key>, building it once under a lock with build(tmp_dir) -> manifest."""
    root = cache_root()
    final = root / key
    if (final / "world.json").is_file():
        return final
    refuse_build(key)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        wait_for_lock(lock, f"world: another process is building {key}; waiting for it (a few minutes)", log)
        if (final / "world.json").is_file():  # built by another process while we waited
            return final
        tmp = root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.time()
        log(f"world: building {key} into {final} (once; cached afterwards)")
        try:
            manifest = build(tmp)
            manifest.update(key=key, version=VERSION, build_seconds=round(time.time() - start, 1))
            (tmp / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"world: {key} built in {time.time() - start:.0f}s")
    return final


def world_dir(log: Callable[[str], None] = print) -> Path:
    return _cached(f"world-{VERSION}", lambda tmp: build_world(tmp, log=log), log)


def base_model(log: Callable[[str], None] = print) -> Path:
    return world_dir(log) / "base"


def task_file(task: str, split: str, log: Callable[[str], None] = print) -> Path:
    if task not in TASKS:
        raise ValueError(f"unknown world task {task!r}{did_you_mean(task, TASKS)}; known: {', '.join(TASKS)}")
    path = world_dir(log) / "data" / task / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"world task {task!r} has no split {split!r} (train, dev, test)")
    return path


WORLD_MODELS.register("world", base_model)
