"""Streamed training data: a stage with a `streaming: true` hub source trains on a `datasets.IterableDataset`.

The rows of a streamed source are read, renamed, checked (posttrain.data: the same checks, `limit` and
`on_bad_rows` as the in-memory path) and converted one at a time while the trainer reads them, so a stage holds
no more of a stream than a batch, and a source with `limit: N` reads its first N usable rows and no more. A source
that is not streamed, a streamed one sampled with `fraction`/`rows` (allowed only with a `limit`: it samples that
bounded prefix) and the rows of `replay:` are read into memory as before and streamed from there.

Several parts are mixed with datasets' `interleave_datasets`, drawing with the stage's seed: each part in
proportion to its row count where every count is known before training (an in-memory part's rows, a stream's
`limit`), else in equal shares; `all_exhausted_without_replacement` reads every row of every part once per pass
and repeats none. The stage gets the passes one after another as one endless stream (`_passes`: pass k drawn
with `set_epoch(k)`), so the order depends on (seed, pass) only: a rerun reads the same rows in the same order,
and a resume skips exactly the batches its checkpoint trained.

How this departs from the in-memory path:
* A stream's SFT format (posttrain.data.sft_mode) is decided from the first MODE_ROWS rows of each stream and
  every in-memory row; a later streamed row of another format (a `messages` row among prompt/completion ones) is
  a bad row (`on_bad_rows`). Streamed messages keep their `role` and `content` only: one Arrow type must hold
  every row, and a stream's later rows cannot widen it.
* A stream's row count and bad rows are known only as it is read: its stats record (the "data" event of
  metrics.jsonl) says `rows: null, streamed: true`, and its `bad_rows` is filled in as training reads the rows,
  so the stage's final `bad_rows` metric counts the bad rows met.

Checked against datasets 5.2 (the API used here: `IterableDataset.from_generator`, `interleave_datasets`):
`from_generator` copies its `gen_kwargs` for every pass, so a generator cannot count into an object passed there;
it counts into `_STATS` by a key instead (the trainer reads in this process: posttrain sets
dataloader_num_workers=0). Explicit `features` are given because `interleave_datasets` refuses parts whose
inferred features differ (a struct with one more key).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

from posttrain.data import DataError, DataSource, checked_rows, load_rows, sft_mode, sft_row

# How many rows of each stream decide its SFT format (see the module docstring).
MODE_ROWS = 100
# Stats record of every streamed source a generator counts into, by key (see the module docstring).
_STATS: dict[str, dict] = {}
_keys = itertools.count()


def streamed(sources: list[DataSource]) -> bool:
    """Whether a stage's data is handed to its trainer as a stream: any of its sources streams."""
    return any(src.streaming for src in sources)


# A stage's row conversion: the row as its trainer takes it, or why it cannot be (a bad row, `on_bad_rows`).
Convert = Callable[[dict], "dict | str"]


def _stream_rows(key: str, src: DataSource, shape: str, convert: Convert) -> Iterator[dict]:
    """One pass over streamed source `src`: its usable rows up to `limit`, converted; a row `convert` refuses is a
    bad row. Counts into `_STATS[key]`: rows (the most one pass kept) and bad rows (the most one pass met)."""
    stats, bad = _STATS[key], []
    name, it = checked_rows(src, shape, lambda m: None, bad)
    kept = 0
    for n, row, _ in it:
        row = convert(row)
        if isinstance(row, str):
            if src.on_bad_rows == "error":
                raise DataError(f"{name} row {n}: {row} (set on_bad_rows: skip to drop bad rows)")
            bad.append(f"row {n}: {row}")
        if len(bad) > stats["bad_rows"]:  # counted before the row is handed on: a trainer may stop at any row
            stats.update(bad_rows=len(bad), bad_examples=bad[:5])
        if isinstance(row, dict):
            kept += 1
            stats["rows"] = max(stats["rows"] or 0, kept)
            yield row


def _listed_rows(rows: "_Rows") -> Iterator[dict]:
    yield from rows


def first_rows(src: DataSource, shape: str, n: int = MODE_ROWS) -> list[dict]:
    """The first usable rows of a stream among its first `n` rows read (bad ones fail or are skipped as set)."""
    _, it = checked_rows(src, shape, lambda m: None, [], read_at_most=n)
    return [row for _, row, _ in it]


def _parts(sources: list[DataSource], shape: str, log: Callable[[str], None], seed: int,
           extra: tuple[list[dict], list[dict]]) -> list[tuple[DataSource | None, list[dict] | None, dict | None]]:
    """(streamed source or None, in-memory rows or None, stats record) of every source, then of `extra`'s rows
    (their stats records are `extra`'s own: None here)."""
    parts: list[tuple[DataSource | None, list[dict] | None, dict | None]] = []
    for src in sources:
        if src.streaming and src.fraction is None and src.rows is None:
            name = f"{src.source}[{src.split}]"
            parts.append((src, None, {"source": name, "rows": None, "streamed": True, "bad_rows": 0,
                                      "bad_examples": []}))
            log(f"data: streaming {name}" + (f" (its first {src.limit:,} usable rows)" if src.limit else ""))
        else:  # read into memory: a local file or world task, or a stream's bounded prefix sampled (load_rows)
            rows, stats = load_rows(src, shape, log, seed)
            parts.append((None, rows, stats))
    if extra[0]:
        parts.append((None, extra[0], None))
    return parts


def _mix(parts: list[tuple[DataSource | None, list[dict] | None, dict | None]], shape: str, convert: Convert,
         features: Any, seed: int):
    """One IterableDataset over every part (module docstring: the mixing rule)."""
    from datasets import IterableDataset, interleave_datasets

    streams, sizes = [], []
    for src, rows, stats in parts:
        if src is None:
            converted = [convert(r) for r in rows]
            if bad := next((r for r in converted if isinstance(r, str)), None):  # as the in-memory path refuses it
                raise DataError(bad)
            # wrapped: a list in gen_kwargs would be split into shards by datasets
            gen, kwargs = _listed_rows, {"rows": _Rows(converted)}
            sizes.append(len(rows))
        else:
            key = f"{next(_keys)}:{src.source}"
            _STATS[key] = stats
            gen, kwargs = _stream_rows, {"key": key, "src": src, "shape": shape, "convert": convert}
            sizes.append(src.limit)
        streams.append(IterableDataset.from_generator(gen, gen_kwargs=kwargs, features=features))
    mixed = streams[0]
    if len(streams) > 1:
        known = all(n is not None for n in sizes)
        probabilities = [n / sum(sizes) for n in sizes] if known else [1 / len(sizes)] * len(sizes)
        mixed = interleave_datasets(streams, probabilities=probabilities, seed=seed,
                                    stopping_strategy="all_exhausted_without_replacement")
    return IterableDataset.from_generator(_passes, gen_kwargs={"mixed": mixed}, features=features)


def _passes(mixed: Any) -> Iterator[dict]:
    """`mixed` pass after pass (pass k drawn with `set_epoch(k)`), without end: the trainer stops at max_steps.

    Why one endless pass: for a dataset without a length the HF Trainer counts an epoch as max_steps steps, so a
    resume from a checkpoint past the stream's first pass would skip the wrong batches (it skips global_step
    batches of the pass it believes it is in, and starts the next pass over). Endless, the trainer's one pass
    is this whole sequence, and skip_first_batches(global_step) lands exactly where the checkpoint stopped.
    """
    for k in itertools.count():
        mixed.set_epoch(k)
        empty = True
        for row in mixed:
            empty = False
            yield row
        if empty:
            raise DataError("the streamed data has no usable rows")


class _Rows:
    """Rows held in memory, as one `gen_kwargs` value that datasets does not split into shards (a list it would)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)


def _sft_convert(mode: str) -> Convert:
    def convert(row: dict) -> dict | str:
        out = sft_row(row, mode)
        if out is None:
            return "of another format than the stream's first rows (a streamed SFT source keeps one)"
        if mode == "messages":
            return {"messages": role_and_content(out["messages"])}
        return {"prompt": out["prompt"], "completion": out["completion"]}

    return convert


def role_and_content(messages: Any) -> Any:
    """Messages with `role` and `content` only (one Arrow type for every streamed row); a string as it is."""
    return [{"role": m["role"], "content": m["content"]} for m in messages] if isinstance(messages, list) else messages


def message_features(chat: bool, *columns: str):
    """datasets Features of `columns`, each a message list (`chat`) or a string."""
    from datasets import Features, List, Value

    kind = List({"role": Value("string"), "content": Value("string")}) if chat else Value("string")
    return Features({c: kind for c in columns})


def stream_dataset(sources: list[DataSource], shape: str, log: Callable[[str], None], seed: int,
                   extra: tuple[list[dict], list[dict]], convert: Convert, features: Any) -> tuple[Any, list[dict]]:
    """(IterableDataset, stats records) of `sources` and `extra`'s in-memory rows (replay, rehearsal) with their
    stats, every row `convert`ed to the stage's format (`features`); module docstring: how."""
    parts = _parts(sources, shape, log, seed, extra)
    dataset = _mix(parts, shape, convert, features, seed)
    return dataset, [stats for *_, stats in parts if stats is not None] + extra[1]


def sft_stream(sources: list[DataSource], log: Callable[[str], None], seed: int,
               extra: tuple[list[dict], list[dict]] = ([], [])) -> tuple[Any, list[dict], str]:
    """(IterableDataset of SFT rows in one format, stats records, that format: posttrain.data.sft_mode) of
    `sources` and `extra`'s in-memory rows (replay)."""
    parts = _parts(sources, "sft", log, seed, extra)
    sample = [row for src, rows, _ in parts for row in (rows if src is None else first_rows(src, "sft"))]
    if not sample:
        raise DataError(f"{parts[0][2]['source']}: no usable rows among the first {MODE_ROWS} of the stream")
    mode = sft_mode(sample)
    if mode == "messages":
        features = message_features(True, "messages")
    else:
        features = message_features(mode == "chat", "prompt", "completion")
    dataset = _mix(parts, "sft", _sft_convert(mode), features, seed)
    return dataset, [stats for *_, stats in parts if stats is not None] + extra[1], mode
