"""Data sources: row shapes, file types, mixed formats (malformed rows, named or skipped and counted:
tests/reliability/test_bad_rows.py)."""
import json

import pytest

from posttrain.data import DataError, DataSource, is_conversational, load_dataset_rows, load_rows, rename_columns

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write(tmp_path, lines: list[bytes], name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_preference_and_prompt_shapes(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "p", "chosen": "c", "rejected": ""}).encode()])
    with pytest.raises(DataError, match="row 1: 'rejected' is empty"):
        load_rows(DataSource(source=str(p)), "preference")
    q = _write(tmp_path, [json.dumps({"question": "2+2?", "answer": "4"}).encode()], "q.jsonl")
    rows, _ = load_rows(DataSource(source=str(q), columns={"prompt": "question"}), "prompt")
    assert rows == [{"prompt": "2+2?", "answer": "4"}]


def test_json_and_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = tmp_path / "d.json"
    j.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]))
    rows, _ = load_rows(DataSource(source=str(j)), "sft")
    assert [r["completion"] for r in rows] == ["b", "d"]
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "x", "completion": ""}]), tmp_path / "d.parquet")
    with pytest.raises(DataError, match="row 2: 'completion' is empty"):
        load_rows(DataSource(source=str(tmp_path / "d.parquet")), "sft")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows(DataSource(source=str(tmp_path / "none.jsonl")), "sft")


def test_mixed_formats_become_chat(tmp_path):
    a = _write(tmp_path, [json.dumps(GOOD).encode()], "a.jsonl")
    b = _write(tmp_path, [json.dumps({"prompt": "q", "completion": "r"}).encode()], "b.jsonl")
    ds, stats = load_dataset_rows([DataSource(source=str(a)), DataSource(source=str(b))], "sft")
    assert ds.column_names == ["messages"] and ds[1]["messages"][-1] == {"role": "assistant", "content": "r"}
    assert [s["rows"] for s in stats] == [1, 1]


def test_column_renames_read_the_original_row(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "answer", "completion": "question"}).encode()])
    rows, _ = load_rows(DataSource(source=str(p), columns={"prompt": "completion", "completion": "prompt"}), "sft")
    assert rows == [{"prompt": "question", "completion": "answer"}]


def test_rename_columns_swaps_chains_and_skips_absent_columns():
    row = {"a": 1, "b": 2, "c": 3, "keep": 4}
    assert rename_columns(row, {"a": "b", "b": "c", "c": "a"}) == {"a": 2, "b": 3, "c": 1, "keep": 4}
    assert rename_columns(row, {"prompt": "missing"}) == row
    assert rename_columns(row, {"prompt": "keep"}) == {"a": 1, "b": 2, "c": 3, "prompt": 4}
    assert row == {"a": 1, "b": 2, "c": 3, "keep": 4}  # the input row is not changed


CONV_PROMPT = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2 + 3?"}]


def test_conversational_prompt_with_string_completion_becomes_conversational(tmp_path):
    # TRL adds prompt + completion, so a message list and a string there is a TypeError.
    a = _write(tmp_path, [json.dumps({"prompt": CONV_PROMPT, "completion": "5"}).encode()], "a.jsonl")
    ds, _ = load_dataset_rows([DataSource(source=str(a))], "sft")
    assert ds.column_names == ["completion", "prompt"]
    assert ds[0] == {"prompt": CONV_PROMPT, "completion": [{"role": "assistant", "content": "5"}]}
    # A plain source beside it: one Arrow column cannot hold strings and lists, so it becomes chat too.
    b = _write(tmp_path, [json.dumps({"prompt": "q", "completion": "r"}).encode()], "b.jsonl")
    ds, _ = load_dataset_rows([DataSource(source=str(a)), DataSource(source=str(b))], "sft")
    assert ds[1] == {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "r"}]}
    assert is_conversational(ds)


def test_plain_prompt_completion_rows_stay_plain(tmp_path):
    b = _write(tmp_path, [json.dumps({"prompt": "q", "completion": "r"}).encode()], "b.jsonl")
    ds, _ = load_dataset_rows([DataSource(source=str(b))], "sft")
    assert ds[0] == {"prompt": "q", "completion": "r"} and not is_conversational(ds)


def test_messages_rows_keep_only_messages(tmp_path):
    # World task rows carry their prompt beside the messages; TRL would read a `prompt` column as prompt/completion.
    a = _write(tmp_path, [json.dumps({**GOOD, "prompt": "hi"}).encode()], "a.jsonl")
    ds, _ = load_dataset_rows([DataSource(source=str(a))], "sft")
    assert ds.column_names == ["messages"] and ds[0] == GOOD and is_conversational(ds)


def test_a_folder_is_not_a_data_file(tmp_path):
    """A source that is a folder said "data file not found", as if it did not exist."""
    with pytest.raises(DataError) as e:
        load_rows(DataSource(source=str(tmp_path)), "sft")
    assert str(e.value) == f"{tmp_path} is a folder, not a data file (use a .jsonl, .json or .parquet file)"
