"""What a stage's inputs are, for its DONE hash: the input model (an earlier stage's DONE key, a hub snapshot's
commit, a folder's file hashes), other files, and the data it trains on (source contents, and the earlier
stages' sources a `replay:` mixes in). A changed identity reruns the stage (posttrain.pipeline).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.data import hub_identity
from posttrain.hub_pins import snapshot_identity
from posttrain.rundir import hash_folder, sha256_file, sha256_json
from posttrain.world import VERSION
from posttrain.world.tasks import TASKS


def input_identity(ref: str, resolved: str, done_keys: dict[str, str]) -> str:
    """What the stage's input *is*: a stage's DONE key, a hub snapshot's `hub:<name>@<commit>`, a folder's file
    hashes, or a hub name."""
    if ref in done_keys:
        return done_keys[ref]
    path = Path(resolved)
    if not path.is_dir():
        return f"hub:{resolved}"
    return snapshot_identity(path) or sha256_json(hash_folder(path))


def file_identity(path: str) -> str:
    """A file's sha256 (a missing one hashes as such: the stage fails on it when it runs)."""
    p = Path(path).expanduser()
    return sha256_file(p) if p.is_file() else f"missing:{path}"


def source_identity(src: Any) -> str:
    path = Path(src.source).expanduser()
    if src.source in TASKS:
        return f"world-{VERSION}:{src.source}:{src.split}"
    return sha256_file(path) if path.is_file() else hub_identity(src)


def data_identity(stage: Any) -> list[Any]:
    """What the stage trains on: its sources' contents, and for each `replay:` entry the earlier stage's sources
    with their settings (not in this stage's config, so not in its config hash). No replay: the list it always was."""
    out: list[Any] = [source_identity(src) for src in stage.training_data()]
    for r in getattr(stage, "replay", None) or []:
        out.append({"replay": r.model_dump(), "data": [[source_identity(s), s.model_dump()] for s in r.sources()]})
    return out
