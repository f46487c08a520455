"""Training data: world tasks, local JSONL/JSON/parquet files and hub datasets, checked row by row.

Each stage kind asks for one shape of row; every row is checked before training starts. A malformed row
(bad JSON, non-UTF-8 bytes, a missing column, an empty or mistyped field) fails with the file and the row
number (1-based, as an editor shows it), or with `on_bad_rows: skip` is dropped and counted.

Shapes:
  sft         {"messages": [{"role", "content"}, ...]}  or  {"prompt", "completion"}: strings, or message lists
  preference  {"prompt", "chosen", "rejected"}: strings, or message lists (conversational)
  prompt      {"prompt": str | messages, "answer": str}   (verifiable problems for GRPO)
"""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import Field, model_serializer, model_validator

from posttrain import world  # through the module: tests replace task_file
from posttrain.row_checks import check_kto, check_preference, check_prompt, check_sft
from posttrain.hub_pins import PinError, dataset_identity, load_hub_dataset, source_pin_problem
from posttrain.mixture import check_share, sample_rows
from posttrain.registry import did_you_mean
from posttrain.schema import Strict
from posttrain.world.tasks import TASKS


class DataError(ValueError):
    """Bad data the user must fix; the message names the file and row."""


# A row with more text than this is almost always a mistake (a whole document in one field, a file read into
# a column) that would be cut to max_length tokens without a word; 1 MB is ~250k tokens, beyond any context.
MAX_ROW_BYTES = 1_000_000


class DataSource(Strict):
    source: str = Field(description="world task name | local .jsonl/.json/.parquet | hub dataset name")
    split: str = "train"
    subset: str | None = Field(None, description="hub dataset config name")
    columns: dict[str, str] = Field(default_factory=dict, description="our column -> dataset column")
    limit: int | None = Field(None, ge=1, description="the first N usable rows, in file order (before sampling)")
    fraction: float | None = Field(None, gt=0, description="sample this share of the rows, shuffled (> 1 upsamples)")
    rows: int | None = Field(None, ge=1, description="sample this many rows, shuffled (over the source's upsamples)")
    on_bad_rows: Literal["error", "skip"] = "error"
    max_row_bytes: int = Field(MAX_ROW_BYTES, ge=1, description="a row with more text (UTF-8 bytes) is a bad row")
    revision: str | None = Field(None, min_length=1, description="hub dataset: branch, tag or commit (default main)")
    streaming: bool = Field(False, description="hub dataset: train from a stream read row by row (needs max_steps)")

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict:
        # Left out while at its default: the field came after runs whose DONE hashes a stage's dumped config,
        # and a field every dump carries would have made every finished stage rerun.
        out = handler(self)  # fraction, rows, revision and streaming likewise, while unset
        if out.get("max_row_bytes") == MAX_ROW_BYTES:
            del out["max_row_bytes"]
        return {k: v for k, v in out.items() if v not in (None, False) or k not in ("fraction", "rows", "revision",
                                                                                 "streaming")}

    @model_validator(mode="after")
    def _one_share(self) -> "DataSource":
        check_share(self.fraction, self.rows, "")
        local = self.source in TASKS or Path(self.source).suffix in DATA_SUFFIXES or Path(self.source).exists()
        if problem := source_pin_problem(self, local):
            raise ValueError(problem)
        return self


CHECKS: dict[str, Callable[[dict], str | None]] = {"sft": check_sft, "preference": check_preference, "prompt": check_prompt,
                                                  "kto": check_kto}
KEEP = {
    "sft": ("messages", "prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "chosen", "rejected", "completion", "label"),
    "prompt": ("prompt", "answer", "tests"),
}


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"not valid UTF-8 (byte {e.start})"
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield n, None, f"bad JSON ({e.msg} at column {e.colno})"
                continue
            yield (n, row, None) if isinstance(row, dict) else (n, None, "expected a JSON object")


def _iter_table(rows: Any) -> Iterator[tuple[int, dict | None, str | None]]:
    for n, row in enumerate(rows, start=1):
        yield (n, dict(row), None) if isinstance(row, dict) else (n, None, "expected an object")


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_SUFFIX_WORDS = "use a .jsonl, .json or .parquet file"


def source_problem(src: DataSource) -> str | None:
    """What is wrong with `src.source`, in one line without the key path, when that is known before anything
    loads (so a config is refused at load, not after earlier stages trained), else None: a local data file that
    does not exist or is of another type, a folder, or a bare name (no `/`, no suffix) close to a world task name, which is a typo of
    it far more often than a hub dataset (those are named org/name). Reads the filesystem only, never the hub."""
    if src.source in TASKS:
        return None
    path = Path(src.source).expanduser()
    if not src.source.strip():
        return f"empty source (a world task: {', '.join(TASKS)}; a .jsonl/.json/.parquet file; or a hub dataset)"
    if path.is_dir():
        return f"{path} is a folder, not a data file ({_SUFFIX_WORDS})"
    if path.suffix in DATA_SUFFIXES or path.exists():  # a local file, as _open_source reads it
        if not path.is_file():
            return f"data file {path} not found"
        return None if path.suffix in DATA_SUFFIXES else f"{path}: unsupported data file type ({_SUFFIX_WORDS})"
    hint = did_you_mean(src.source, TASKS)
    if hint and "/" not in src.source and not path.suffix:
        return f"no world task {src.source!r}{hint}; a hub dataset is named org/name"
    return None


def _open_source(src: DataSource, log: Callable[[str], None]) -> tuple[str, Iterator]:
    """(name for messages, iterator of (row number, row or None, error or None))."""
    if src.source in TASKS:
        path = world.task_file(src.source, src.split, log)
        return str(path), _iter_jsonl(path)
    path = Path(src.source).expanduser()
    if path.suffix in DATA_SUFFIXES or path.exists():
        if path.is_dir():
            raise DataError(f"{path} is a folder, not a data file ({_SUFFIX_WORDS})")
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        if path.suffix == ".jsonl":
            return str(path), _iter_jsonl(path)
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
            if isinstance(data, dict) and src.split in data:
                data = data[src.split]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of rows (or {{split: rows}})")
            return str(path), _iter_table(data)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return str(path), _iter_table(pq.read_table(path).to_pylist())
        raise DataError(f"{path}: unsupported data file type ({_SUFFIX_WORDS})")
    try:
        return f"{src.source}[{src.split}]", _iter_table(load_hub_dataset(src, log))
    except PinError as e:
        raise DataError(str(e)) from None


def hub_identity(src: DataSource) -> str:
    """What a hub data source is, for DONE: `hub:<name>@<commit a load reads now>:<subset>:<split>`."""
    try:
        return dataset_identity(src)
    except PinError as e:
        raise DataError(str(e)) from None


def rename_columns(row: dict, columns: dict[str, str]) -> dict:
    """`row` with each dataset column `theirs` renamed to `ours` (`columns`: ours -> theirs).

    Every rename reads the original row, so renames that swap or chain names ({prompt: completion, completion:
    prompt}) do not read a value an earlier rename wrote. A dataset column that is not in the row renames nothing.
    """
    renamed = {ours: row[theirs] for ours, theirs in columns.items() if theirs in row}
    moved = set(columns.values())
    return {**{k: v for k, v in row.items() if k not in moved}, **renamed}


def text_bytes(value: Any) -> int:
    """UTF-8 bytes of the text in a row's values (strings, message contents, numbers as written)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "replace"))
    if isinstance(value, dict):
        return sum(text_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_bytes(v) for v in value)
    return 0 if value is None else len(str(value))


def checked_rows(src: DataSource, shape: str, log: Callable[[str], None], bad: list[str],
                  read_at_most: int | None = None) -> tuple[str, Iterator[tuple[int, dict, int]]]:
    """(name for messages, iterator of (row number, kept row, its text bytes)) over the usable rows of `src`, up
    to `limit` (and among the first `read_at_most` rows read, bad ones included); a bad row (`CHECKS[shape]`, or
    more text than `max_row_bytes`) raises DataError naming the file and the row, or with `on_bad_rows: skip` is
    described in `bad` and left out."""
    check = CHECKS[shape]
    name, it = _open_source(src, log)
    if read_at_most is not None:
        it = islice(it, read_at_most)  # stops the underlying iterator: a stream reads no row past the prefix

    def rows() -> Iterator[tuple[int, dict, int]]:
        kept = 0
        for n, row, err in it:
            size = 0
            if row is not None:
                row = rename_columns(row, src.columns)
                err = check(row)
                if not err:
                    row = {k: row[k] for k in KEEP[shape] if k in row}
                    size = text_bytes(row)
                    if size > src.max_row_bytes:
                        err = (f"{size:,} bytes of text, over max_row_bytes ({src.max_row_bytes:,}; raise it on the "
                               "data source if the row is meant)")
            if err:
                if src.on_bad_rows == "error":
                    raise DataError(f"{name} row {n}: {err} (set on_bad_rows: skip to drop bad rows)")
                bad.append(f"row {n}: {err}")
                continue
            yield n, row, size
            kept += 1
            if src.limit and kept >= src.limit:
                break

    return name, rows()


def _stats(name: str, kept: int, bad: list[str]) -> dict:
    if not kept:
        raise DataError(f"{name}: no usable rows" + (f" ({len(bad)} bad, first: {bad[0]})" if bad else ""))
    return {"source": name, "rows": kept, "bad_rows": len(bad), "bad_examples": bad[:5]}


def load_rows(src: DataSource, shape: str, log: Callable[[str], None] = print,
              seed: int = 0) -> tuple[list[dict], dict]:
    """Read, rename (`columns`), check and trim (`limit`) rows, then sample them (`fraction`/`rows`, with `seed`:
    posttrain.mixture); returns (rows, stats with bad-row counts)."""
    bad: list[str] = []
    name, it = checked_rows(src, shape, log, bad)
    rows = [row for _, row, _ in it]
    stats = _stats(name, len(rows), bad)
    rows = sample_rows(rows, src.fraction, src.rows, seed, f"{src.source}:{src.subset}:{src.split}")
    stats["rows"] = len(rows)
    if bad:
        log(f"data: skipped {len(bad)} bad rows in {name} (first: {bad[0]})")
    return rows, stats


# Source and shape -> stats of a check that passed, while the file is unchanged (see check_source).
_CHECKED: dict[tuple, dict] = {}
# A row with more than this many bytes of text per max_length token is "far" longer than max_length: text runs
# 3-5 bytes a token with the usual BPE vocabularies, so such a row holds about twice max_length or more.
FAR_BYTES_PER_TOKEN = 8


# A streamed source is checked on this many rows at most before training (its `limit` if smaller): a stream can be
# far larger than the run reads of it, and the stage checks every row it reads as it goes (posttrain.data_stream).
PREFIX_ROWS = 1000


def check_source(src: DataSource, shape: str, log: Callable[[str], None] = print,
                 max_length: int | None = None) -> dict:
    """Read every row of `src` as a stage would (the same checks, `limit` and `on_bad_rows`), keeping none, so
    bad data is refused before a run dir exists or any model loads; returns the stats `load_rows` would. A
    streamed source is read only to its first PREFIX_ROWS rows (or `limit`), and the line says so. With
    `max_length` (tokens), counts the rows far longer than that (more than FAR_BYTES_PER_TOKEN bytes of text a
    token), which the trainer cuts without a word, and warns. A local file or world task already checked
    unchanged in this process is not read again."""
    key = (src.model_dump_json(), shape, max_length, _file_state(src))
    if key in _CHECKED:
        return _CHECKED[key]
    bad: list[str] = []
    prefix = min(src.limit or PREFIX_ROWS, PREFIX_ROWS) if src.streaming else None
    name, it = checked_rows(src, shape, lambda m: None, bad, read_at_most=prefix)
    kept, long_rows = 0, []
    far = FAR_BYTES_PER_TOKEN * max_length if max_length else None
    for n, _, size in it:
        kept += 1
        if far is not None and size > far:
            long_rows.append((n, size))
    stats = _stats(name, kept, bad)
    skipped = f"; {len(bad)} bad rows will be skipped (first: {bad[0]})" if bad else ""
    what = f"{kept:,} rows" if prefix is None else f"{kept:,} rows of a prefix (streamed: its first {prefix:,} read)"
    log(f"data: checked {name}: {what}{skipped}")
    if long_rows:
        n, size = long_rows[0]
        log(f"data: warning: {len(long_rows):,} rows of {name} have over {far:,} bytes of text, far more than "
            f"trainer.max_length ({max_length} tokens); training cuts them to max_length (first: row {n}, "
            f"{size:,} bytes)")
    _CHECKED[key] = stats
    return stats


def _file_state(src: DataSource) -> tuple | None:
    """What identifies the contents of a local data file (inode, size, mtime); None for world tasks (fixed by
    the world's version) and hub datasets (fixed by their cache)."""
    path = Path(src.source).expanduser()
    if not path.is_file():
        return None
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def load_sources(sources: list[DataSource], shape: str, log: Callable[[str], None] = print, seed: int = 0):
    """The checked (and sampled: load_rows) rows of every source, in order, plus per-source stats."""
    all_rows: list[dict] = []
    stats = []
    for src in sources:
        rows, st = load_rows(src, shape, log, seed)
        all_rows += rows
        stats.append(st)
    return all_rows, stats


def rows_dataset(rows: list[dict]):
    """One `datasets.Dataset` with uniform columns: a column some rows lack is None there."""
    from datasets import Dataset

    keys = sorted({k for r in rows for k in r})
    return Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])


def load_dataset_rows(sources: list[DataSource], shape: str, log: Callable[[str], None] = print, seed: int = 0):
    """Concatenate sources into one `datasets.Dataset` (uniform columns) plus per-source stats."""
    rows, stats = load_sources(sources, shape, log, seed)
    return rows_dataset(sft_rows(rows) if shape == "sft" else rows), stats


def sft_rows(rows: list[dict]) -> list[dict]:
    """Checked SFT rows in one format TRL accepts (`sft_mode` says which), since one Arrow column cannot hold both
    strings and message lists, and TRL adds a prompt to its completion (a message list plus a string is a
    TypeError there)."""
    mode = sft_mode(rows)
    return [sft_row(r, mode) for r in rows]


def sft_mode(rows: list[dict]) -> str:
    """The one format `rows` become (posttrain.data_stream decides it from a stream's first rows):

    * `messages` if any row has `messages`: every prompt/completion row becomes `messages` (prompt + completion),
      so one collator serves all, and a `messages` row keeps only `messages` (world task rows also carry their
      `prompt`, which TRL would otherwise read as a prompt/completion row);
    * else `chat` if any prompt or completion is conversational: every string prompt becomes one user message and
      every string completion one assistant message (TRL's conversational prompt-completion: loss on the
      completion only, and no `{% generation %}` markers needed);
    * else `plain`: prompt/completion rows, unchanged.
    """
    if any("messages" in r for r in rows):
        return "messages"
    if any(isinstance(r[k], list) for r in rows for k in ("prompt", "completion")):
        return "chat"
    return "plain"


def sft_row(row: dict, mode: str) -> dict | None:
    """One checked SFT row in format `mode` (`sft_mode`); None when it cannot be (a `messages` row, or outside
    `messages` a conversational one, among rows of a plainer format: met only in a stream)."""
    if mode == "messages":
        return {"messages": row["messages"]} if "messages" in row else _to_messages(row)
    if "messages" in row:
        return None
    if mode == "chat":
        return {"prompt": _as_chat(row["prompt"], "user"), "completion": _as_chat(row["completion"], "assistant")}
    return None if any(isinstance(row[k], list) for k in ("prompt", "completion")) else row


def is_conversational(rows: Any) -> bool:
    """Whether SFT rows (after `sft_rows`; a list or a `datasets.Dataset`) go through the chat template."""
    if len(rows) == 0:
        return False
    first = rows[0]
    return "messages" in first or isinstance(first.get("prompt"), list)


def _as_chat(value: Any, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _to_messages(row: dict) -> dict:
    return {"messages": _as_chat(row["prompt"], "user") + _as_chat(row["completion"], "assistant")}
