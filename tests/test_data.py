"""Data sources: row shapes, file types, mixed formats (malformed rows, named or skipped and counted:
tests/reliability/test_bad_rows.py)."""
import json

import pytest

from posttrain.data import DataError, DataSource, load_dataset_rows, load_rows

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
