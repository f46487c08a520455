"""Check a model folder's files before anything loads them, so a broken model is refused in seconds (exit 2,
naming the file) instead of failing, or training on garbage, after the base eval.

`check_model(folder)` checks, in this order:

* the opt-ins: pickle weights and a model's own code (`models.check_weights`, `models.check_remote_code`);
* `config.json` parses;
* every `*.safetensors` file of the folder: its header (length, JSON, dtypes, offsets that fit the shapes) and
  its size against the header, which finds a file cut short by a copy or a download (`tensors.read_header`);
* `model.safetensors.index.json`: it parses, its shards exist and hold the tensors it places in them;
* a NaN/Inf scan of every floating-point tensor, streamed in 1 MiB slices into one reused buffer per dtype:
  each file is read once, and memory stays at a few MiB whatever the model's size.

A file is checked once per process while it is unchanged (same path, inode, size and mtime), so the same
model named by several stages, or checked before the run and again when its stage starts, is read once.
Pickle weights (with `allow_pickle: true`) are not scanned: they cannot be streamed without loading them.

Checked first: safetensors' `safe_open` reads headers and tensors, but it memory-maps the file (every page
read stays in the process's RSS until the handle closes; see posttrain/tensors.py) and its header errors do
not name the file ("incomplete metadata"), so the scan reads through tensors.ShardedReader, which preads.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from posttrain.models import ModelError, check_remote_code, check_weights, hub_cache_folder, resolve_model
from posttrain.registry import WORLD_MODELS
from posttrain.tensors import INDEX_FILE, SINGLE_FILE, ShardedReader  # torch: imported before any clock starts
from posttrain.world import NotBuilt, only_built

_SLICE_BYTES = 1 << 20
# (resolved path, inode, size, mtime_ns) -> (tensors, floating-point values) of a file that passed.
_CHECKED_FILES: dict[tuple, tuple[int, int]] = {}


def check_model(folder: str, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                log: Callable[[str], None] = print) -> None:
    """Refuse (ModelError, one line naming the file) a model folder whose files are broken; a hub name is
    checked in the local hub cache when it is there, else left to transformers. Logs what it checked."""
    path = Path(folder)
    if not path.is_dir():
        path = hub_cache_folder(folder)
        if path is None:
            return
    check_weights(str(path), allow_pickle)
    check_remote_code(str(path), trust_remote_code, log)
    _check_json(path / "config.json")
    files = sorted(path.glob("*.safetensors"))
    start, tensors, values, scanned = time.monotonic(), 0, 0, 0
    for file in files:
        key = _file_key(file)
        if key not in _CHECKED_FILES:
            _CHECKED_FILES[key] = _scan(file)
            scanned += 1
        tensors += _CHECKED_FILES[key][0]
        values += _CHECKED_FILES[key][1]
    _check_index(path)
    if scanned:
        size = sum(f.stat().st_size for f in files)
        log(f"model: checked {path}: {len(files)} safetensors file{'s' if len(files) != 1 else ''} "
            f"({size / 1e6:,.1f} MB): headers, sizes, {tensors} tensors, {values:,} values all finite "
            f"({time.monotonic() - start:.2f}s)")


def existing_model(ref: str) -> str | None:
    """The folder `ref` names when it exists now, without building anything: a local folder, a world model
    already in the cache, a hub model in the local hub cache; None for one not built or downloaded yet (it is
    checked when its stage starts) and for a stage reference."""
    if "${" in ref:
        return None
    if ref in WORLD_MODELS:
        with only_built():
            try:
                return str(WORLD_MODELS.get(ref)(log=lambda m: None))
            except NotBuilt:
                return None
    path = Path(ref).expanduser()
    if path.is_dir():
        return resolve_model(ref)  # refuses a folder without config.json
    cached = hub_cache_folder(ref)
    return str(cached) if cached is not None else None


def _file_key(file: Path) -> tuple:
    st = file.stat()
    return (str(file.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def _check_json(file: Path) -> None:
    if not file.is_file():
        return
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model file {file}: not valid JSON ({e}); copy or save the model again") from None


def _check_index(folder: Path) -> None:
    """The index parses, and every shard it names exists and holds the tensors it places there."""
    index = folder / INDEX_FILE
    if not index.is_file() or (folder / SINGLE_FILE).is_file():
        return  # transformers reads model.safetensors first, and then never the index
    _check_json(index)
    try:
        ShardedReader(folder).close()
    except (OSError, ValueError, KeyError, TypeError) as e:  # a shard missing, a tensor not where the index says
        raise ModelError(f"model file {index}: {e}") from None


def _scan(file: Path) -> tuple[int, int]:
    """(tensors, floating-point values) of one safetensors file whose header and size are sound and whose
    floating-point values are all finite; ModelError naming the file otherwise."""
    import torch

    try:
        reader = ShardedReader(file.parent, files=[file.name])
    except ValueError as e:  # read_header's message starts with the file's path
        raise ModelError(f"model file {e}; copy or save the model again") from None
    values = 0
    buffers: dict[torch.dtype, torch.Tensor] = {}
    with reader:
        for name in reader.names():
            dtype, n = reader.dtype(name), reader.numel(name)
            if not dtype.is_floating_point:
                continue
            step = max(1, _SLICE_BYTES // dtype.itemsize)
            buf = buffers.setdefault(dtype, torch.empty(step, dtype=dtype))
            bad = 0
            for lo in range(0, n, step):
                part = reader.read_flat(name, lo, min(n, lo + step), out=buf)
                if _all_finite(part):
                    continue
                # float8 has no isfinite kernel on every build: widen those slices (1 byte a value, cheap).
                bad += int((~torch.isfinite(part if dtype.itemsize > 1 else part.float())).sum())
            if bad:
                raise ModelError(f"model file {file}: tensor {name!r} holds {bad:,} NaN or infinite values (of "
                                 f"{n:,}); the weights were broken before any training: export or download the "
                                 "model again")
            values += n
    return len(reader), values


def _all_finite(part) -> bool:
    """Whether every value is finite, in one reduction: a float64 sum is NaN or infinite exactly when a value
    is (finite float32/16/bf16/fp8 values cannot overflow it), and a sum is several times faster here than
    isfinite().all(), which writes a mask first. float64 itself can overflow a sum: isfinite there."""
    import torch

    if part.dtype == torch.float64:
        return bool(torch.isfinite(part).all())
    return bool(torch.isfinite(torch.sum(part, dtype=torch.float64)))


def scan_cache_clear() -> None:
    """Forget which files passed (tests that rewrite a file in place within one mtime tick)."""
    _CHECKED_FILES.clear()

