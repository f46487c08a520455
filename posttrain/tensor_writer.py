"""Writing safetensors shards tensor by tensor, straight into their files: `ShardedWriter` (the merge and
transfer stages' output). Reading, the file names and the errors: posttrain.tensors.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from posttrain.tensors import DTYPE_CODES, INDEX_FILE, SINGLE_FILE
class ShardedWriter:
    """Write tensors into a Hugging Face model folder as they come, in shards of at most ``max_shard_bytes``.

    A shard is written when the next tensor would push the buffer past ``max_shard_bytes`` (a single tensor
    larger than that gets a shard of its own, as in transformers). ``close()`` writes the last shard, renames
    the shards to ``model-0000i-of-0000N.safetensors`` (or ``model.safetensors`` when there is only one) and
    writes ``model.safetensors.index.json``. Every file carries ``{"format": "pt"}``, which transformers needs.
    The default of 5 GB is transformers' ``save_pretrained`` default.

    ``layout`` (every tensor's ``(name, shape, dtype)``, in the order they will be added) fixes the shards in
    advance, by the same rule: the shard files and their headers are written at once and ``add`` writes each
    tensor straight to its offset (``os.pwrite``), holding nothing. Tensors may then come in any order, but
    each must match its layout entry, and ``close()`` refuses while any is missing. Inside a shard tensors lie
    largest element first, then by name (safetensors' own order keeps every tensor aligned to its element).
    """

    def __init__(self, folder: str | os.PathLike[str], *, max_shard_bytes: int = 5_000_000_000,
                 layout: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in self.folder.glob("model*.safetensors*"))
        if stale:
            raise FileExistsError(f"{self.folder} already holds weights ({stale[0]}); write to an empty folder")
        self.max_shard_bytes = int(max_shard_bytes)
        self.files: list[str] = []  # final file names, filled by close()
        self._buffer: dict[str, Tensor] = {}
        self._buffer_bytes = 0
        self._parts: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names in it)
        self._seen: set[str] = set()
        self._total = 0  # bytes
        self._numel = 0
        self._closed = False
        self._slots: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}  # name -> fd, offset, ...
        self._filled: dict[str, int] = {}  # name -> elements written so far by add_flat
        self._fds: list[int] = []
        if layout is not None:
            self._open_layout(layout)

    def _open_layout(self, layout: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > self.max_shard_bytes:  # the rule add() follows when buffering
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        for items in shards:
            part = f"model-part-{len(self._parts) + 1:05d}.safetensors"
            head, offsets, total = _header(items)
            fd = os.open(self.folder / part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds.append(fd)
            os.write(fd, head)
            os.ftruncate(fd, len(head) + total)
            for name, shape, dtype in items:
                if name in self._slots:
                    raise ValueError(f"tensor {name!r} is twice in the layout")
                self._slots[name] = (fd, len(head) + offsets[name], shape, dtype)
            self._parts.append((part, sorted(n for n, _, _ in items)))

    def add(self, name: str, tensor: Tensor) -> None:
        """Buffer one tensor; writes a shard first if this tensor would overflow the current one."""
        if self._closed:
            raise ValueError(f"{self.folder}: add({name!r}) after close()")
        if name in self._seen:
            raise ValueError(f"tensor {name!r} was added twice")
        if self._fds:
            self._write_slot(name, tensor)
            return
        # Always a private contiguous CPU copy: safetensors refuses tensors that share storage (tied
        # embeddings, views), and the caller may modify its tensor in place before the shard is written.
        t = tensor.detach().to("cpu", copy=True).contiguous()
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = t
        self._buffer_bytes += nbytes
        self._written(name, t.numel(), t.dtype)

    def _write_slot(self, name: str, tensor: Tensor) -> None:
        if name not in self._slots:
            raise ValueError(f"tensor {name!r} is not in the writer's layout")
        fd, offset, shape, dtype = self._slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r} is {list(tensor.shape)} {tensor.dtype}; the layout says "
                             f"{list(shape)} {dtype}")
        if self._filled.get(name):
            raise ValueError(f"tensor {name!r}: add() after add_flat() slices of it")
        _pwrite_tensor(fd, tensor, offset)
        self._written(name, tensor.numel(), dtype)

    def add_flat(self, name: str, start: int, values: Tensor) -> None:
        """Write ``values`` (any shape, read flat) as elements ``[start, start + numel)`` of the flattened tensor
        ``name``; layout mode only. Slices come in order (``start`` is the count written so far), so a gap or an
        overlap is refused; the tensor counts as added once its last element is written."""
        if self._closed or not self._fds:
            raise ValueError(f"{self.folder}: add_flat({name!r}) needs an open writer with a layout")
        if name not in self._slots or name in self._seen:
            raise ValueError(f"tensor {name!r} is not in the writer's layout or was already added")
        fd, offset, shape, dtype = self._slots[name]
        done, n = self._filled.get(name, 0), math.prod(shape)
        if values.dtype != dtype or start != done or start + values.numel() > n:
            raise ValueError(f"tensor {name!r}: slice [{start}, {start + values.numel()}) {values.dtype} does not "
                             f"follow the {done} of {n} {dtype} elements written")
        _pwrite_tensor(fd, values, offset + start * dtype.itemsize)
        self._filled[name] = done + values.numel()
        if self._filled[name] == n:
            self._written(name, n, dtype)

    def _written(self, name: str, n: int, dtype: torch.dtype) -> None:
        """Count tensor ``name`` (``n`` elements of ``dtype``) as added: buffered, or all of it in its slot."""
        self._seen.add(name)
        self._total += n * dtype.itemsize
        self._numel += n

    def _flush(self) -> None:
        part = f"model-part-{len(self._parts) + 1:05d}.safetensors"
        save_file(self._buffer, str(self.folder / part), metadata={"format": "pt"})
        self._parts.append((part, sorted(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, final names and the index; return the weight files written."""
        if self._closed:
            return self.files
        if self._fds:
            missing = [n for n in self._slots if n not in self._seen]
            if missing:
                raise ValueError(f"{self.folder}: close() before tensor {missing[0]!r} of the layout was added")
            self._close_fds()
        if self._buffer:
            self._flush()
        if not self._parts or not self._seen:
            raise ValueError(f"{self.folder}: no tensors were added")
        self._closed = True
        n = len(self._parts)
        weight_map: dict[str, str] = {}
        for i, (part, names) in enumerate(self._parts, start=1):
            final = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / part, self.folder / final)
            self.files.append(final)
            weight_map.update({name: final for name in names})
        if n > 1:
            # total_parameters: transformers 5 writes it too; readers that predate it ignore unknown keys.
            meta = {"total_parameters": self._numel, "total_size": self._total}
            index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On an error leave the partial shards for inspection; no index means no reader mistakes them
        # for a finished model.
        if exc_type is None:
            self.close()
        else:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _pwrite_tensor(fd: int, tensor: Tensor, offset: int) -> None:
    t = tensor.detach().to("cpu").contiguous()
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _header(items: list[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[bytes, dict[str, int], int]:
    """(8-byte length + JSON header padded with spaces to 8 bytes, name -> offset after the header, data bytes)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    pos = 0
    for name, shape, dtype in sorted(items, key=lambda it: (-it[2].itemsize, it[0])):
        end = pos + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [pos, end]}
        offsets[name] = pos
        pos = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets, pos


