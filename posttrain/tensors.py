"""Streaming safetensors reading shared by the merge and transfer stages (writing: posttrain.tensor_writer).

A Hugging Face model folder holds its weights either in one ``model.safetensors`` or in shards listed by
``model.safetensors.index.json``::

    model/
      config.json
      model.safetensors                        # one shard, or:
      model.safetensors.index.json             # {"metadata": {"total_size": N}, "weight_map": {name: file}}
      model-00001-of-00003.safetensors
      model-00002-of-00003.safetensors
      model-00003-of-00003.safetensors

``ShardedReader`` parses each shard's header once and reads one tensor (``get``), or a slice of one
(``read_flat``, into a buffer the caller reuses), with ``os.preadv`` at the header's ``data_offsets``, so a
merge of N models of size S holds a few tensors or a few slices, not N·S, as in mergekit. Not
``safetensors.safe_open``: it memory-maps the shard, and every page a read touches stays in the process's RSS
until the handle closes (docs/notes/merging.md).
``ShardedWriter`` (posttrain.tensor_writer) either buffers tensors up to ``max_shard_bytes`` and writes a shard each time the buffer
would overflow, or, given the ``layout`` of every tensor in advance, writes each tensor (``add``) or each
slice of it in order (``add_flat``) straight to its place in its shard file as it comes and holds none. The
index and the final shard names are written at ``close()``.

Pickle weights (``pytorch_model.bin``, ``*.pt``) can run arbitrary code when loaded, so they are refused unless
the caller opts in with ``allow_pickle=True``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "SINGLE_FILE",
    "INDEX_FILE",
    "PickleRefused",
    "MergeMismatch",
    "ShardedReader",
    "read_header",
    "sha256_file",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

# safetensors header dtype codes -> torch dtypes (the codes safetensors' own torch backend writes).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in _DTYPES.items()}  # torch dtype -> safetensors header code
_MAX_HEADER = 100_000_000  # bytes; safetensors refuses larger headers too


class PickleRefused(ValueError):
    """The folder holds only pickle weights and the caller did not pass ``allow_pickle=True``."""


class MergeMismatch(ValueError):
    """Two models cannot be merged tensor by tensor; the message names the first offending tensor."""


# ---------------------------------------------------------------------------------------------- reader


class ShardedReader:
    """Read the tensors of one Hugging Face model folder, one at a time.

    Looks for ``model.safetensors`` first, then ``model.safetensors.index.json`` (transformers' order). Pickle
    weights are read only with ``allow_pickle=True``, and then as a whole file (pickle cannot be streamed),
    through ``torch.load(weights_only=True, mmap=True)``.
    """

    def __init__(self, folder: str | os.PathLike[str], *, allow_pickle: bool = False, files: list[str] | None = None):
        """``files``: read exactly these safetensors files of the folder (one file at a time, say), not the
        model's weights as transformers would find them."""
        self.folder = Path(folder)
        self._handles: dict[str, int] = {}  # file name -> open file descriptor
        self._pickled: dict[str, Tensor] | None = None
        self._file_of: dict[str, str] = {}  # tensor name -> file name inside the folder
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._span: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor in its file
        if files is not None:
            self._index_safetensors(list(files))
        elif (self.folder / SINGLE_FILE).is_file():
            self._index_safetensors([SINGLE_FILE])
        elif (self.folder / INDEX_FILE).is_file():
            weight_map = json.loads((self.folder / INDEX_FILE).read_text())["weight_map"]
            self._index_safetensors(sorted(set(weight_map.values())), weight_map)
        else:
            self._open_pickle(allow_pickle)

    def _index_safetensors(self, files: list[str], weight_map: dict[str, str] | None = None) -> None:
        for file in files:
            if not (self.folder / file).is_file():
                raise FileNotFoundError(f"{self.folder / INDEX_FILE} lists {file}, which is missing")
            for name, (shape, dtype, start, end) in read_header(self.folder / file).items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # a tensor the index places elsewhere (or leaves out) is not part of the model
                self._file_of[name] = file
                self._meta[name] = (shape, dtype)
                self._span[name] = (start, end)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._file_of))
            if missing:
                raise FileNotFoundError(f"{missing[0]!r} is in {INDEX_FILE} but not in {weight_map[missing[0]]}")

    def _open_pickle(self, allow_pickle: bool) -> None:
        files = sorted(p.name for p in self.folder.glob("*") if p.suffix in _PICKLE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.folder}")
        if not allow_pickle:
            raise PickleRefused(
                f"{self.folder} holds pickle weights ({', '.join(files)}), which can run code when loaded; "
                "pass allow_pickle=True to load them anyway"
            )
        self._pickled = {}
        for file in files:
            state = torch.load(self.folder / file, map_location="cpu", weights_only=True, mmap=True)
            for name, t in state.items():
                self._pickled[name] = t
                self._file_of[name] = file
                self._meta[name] = (tuple(t.shape), t.dtype)

    def _fd(self, file: str) -> int:
        # File descriptors stay open so that get() costs one pread, not an open and a header parse.
        if file not in self._handles:
            self._handles[file] = os.open(self.folder / file, os.O_RDONLY)
        return self._handles[file]

    def names(self) -> list[str]:
        """All tensor names, sorted (so every model is walked in the same order)."""
        return sorted(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._known(name)][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[self._known(name)][1]

    def file_of(self, name: str) -> str:
        """The file (inside the folder) that holds ``name``."""
        return self._file_of[self._known(name)]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def layout(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Every tensor's ``(name, shape, dtype)`` in name order: a ``ShardedWriter`` layout for an output with
        this model's tensors."""
        return [(n, self.shape(n), self.dtype(n)) for n in self.names()]

    def get(self, name: str) -> Tensor:
        """Load one tensor into memory (a fresh CPU tensor; the rest of the shard stays on disk)."""
        shape, dtype = self._meta[self._known(name)]
        if self._pickled is not None:
            return self._pickled[name].clone()
        # torch.empty, not bytearray: no zero-fill pass over memory that the read overwrites anyway.
        out = torch.empty(shape, dtype=dtype)
        self._read(name, 0, out.reshape(-1))
        return out

    def read_flat(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, as a 1-D tensor: ``get(name).reshape(-1)[start:stop]``
        without reading the rest. Read into ``out[: stop - start]`` (1-D, contiguous, the tensor's dtype) when
        given, so a loop over slices reuses one buffer: no allocation and no page faults per slice."""
        dtype = self._meta[self._known(name)][1]
        n = self.numel(name)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"{name!r}: elements [{start}, {stop}) are outside its {n}")
        if out is None:
            out = torch.empty(stop - start, dtype=dtype)
        elif out.dtype != dtype or out.dim() != 1 or not out.is_contiguous() or out.numel() < stop - start:
            raise ValueError(f"{name!r}: out must be a contiguous 1-D {dtype} tensor of >= {stop - start} elements, "
                             f"got {list(out.shape)} {out.dtype}")
        dest = out[: stop - start]
        if self._pickled is not None:
            dest.copy_(self._pickled[name].reshape(-1)[start:stop])
        else:
            self._read(name, start, dest)
        return dest

    def _read(self, name: str, start: int, dest: Tensor) -> None:
        """pread the elements from ``start`` on into the contiguous 1-D tensor ``dest`` (as many as it holds)."""
        if dest.numel() == 0:
            return
        itemsize = dest.element_size()
        view = memoryview(dest.view(torch.uint8).numpy()).cast("B")  # uint8: numpy has no bfloat16
        file = self._file_of[name]
        _pread_into(self._fd(file), view, self._span[name][0] + start * itemsize, self.folder / file)

    def _known(self, name: str) -> str:
        if name not in self._meta:
            raise KeyError(f"no tensor {name!r} in {self.folder}")
        return name

    def __contains__(self, name: object) -> bool:
        return name in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._pickled = None

    def __enter__(self) -> ShardedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype, int, int]]:
    """name -> (shape, dtype, absolute start, absolute end) from a safetensors header: 8 bytes of
    little-endian header length, then that many bytes of JSON; data offsets count from the header's end.
    A ValueError names the file and says what is wrong: a file cut short (its header or its tensors need
    more bytes than it has), a header that is not JSON, an unknown dtype, offsets that do not fit a shape."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if 0 < n <= _MAX_HEADER and 8 + n > size:
            raise ValueError(f"{path}: truncated: its header alone needs {8 + n} bytes, the file has {size}")
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    out: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, dims, offsets = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in dims)
            start, end = (8 + n + int(o) for o in offsets)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry: {info!r}"[:300]) from None
        if code not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {code}")
        out[name] = (shape, _DTYPES[code], start, end)
    data_end = max((end for *_, end in out.values()), default=8 + n)
    if data_end > size:
        raise ValueError(f"{path}: truncated: its header describes {data_end} bytes, the file has {size}")
    for name, (shape, dtype, start, end) in out.items():
        if end - start != math.prod(shape) * dtype.itemsize or not 8 + n <= start <= end <= size:
            raise ValueError(f"{path}: tensor {name!r} has data_offsets {header[name]['data_offsets']} that do not "
                             f"fit its shape {list(shape)} and dtype {header[name]['dtype']} or the file")
    return out


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ValueError(f"{path}: file ended {len(view) - done} bytes early")
        done += got


# ---------------------------------------------------------------------------------------------- checks


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()
