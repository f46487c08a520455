"""Item 7: malformed data rows (bad JSON, a missing column, an empty completion, wrong types, non-UTF-8 bytes)
fail naming the file and the row, or with `on_bad_rows: skip` are dropped and counted (in the stage's
metrics.jsonl and DONE)."""
import json

import pytest

from posttrain.data import DataError, DataSource, load_rows
from tests.reliability.conftest import cli_here

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write(tmp_path, lines: list[bytes], name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


@pytest.mark.parametrize(
    "bad, why",
    [
        (b"{not json", "bad JSON"),
        (b'{"messages": "oops"}', "'messages' must be a non-empty list"),
        (json.dumps({"prompt": "q", "completion": ""}).encode(), "'completion' is empty"),
        (json.dumps({"prompt": 3, "completion": "a"}).encode(), "'prompt' must be a string"),
        (json.dumps({"text": "x"}).encode(), "missing column 'messages'"),
        (b'{"prompt": "\xff\xfe", "completion": "a"}', "not valid UTF-8"),
        (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode(), "no non-empty assistant"),
    ],
)
def test_bad_row_names_file_and_row(tmp_path, bad, why):
    p = _write(tmp_path, [json.dumps(GOOD).encode(), json.dumps(GOOD).encode(), bad])
    with pytest.raises(DataError) as e:
        load_rows(DataSource(source=str(p)), "sft")
    msg = str(e.value)
    assert str(p) in msg and "row 3" in msg and why in msg and "\n" not in msg


def test_skip_counts_bad_rows(tmp_path):
    good = json.dumps(GOOD).encode()
    p = _write(tmp_path, [good, b"{bad", b'{"prompt": "", "completion": "x"}', good])
    rows, stats = load_rows(DataSource(source=str(p), on_bad_rows="skip"), "sft", log=lambda m: None)
    assert len(rows) == 2 and stats["bad_rows"] == 2 and stats["bad_examples"][0].startswith("row 2")


def _stage_args(path, run_dir, *more):
    return ["stage", "sft", "--run-dir", str(run_dir), "--set", "eval.enabled=false",
            "--set", f"data=[{{source: '{path}'{''.join(more)}}}]", "--set", "trainer.max_steps=2",
            "--set", "trainer.per_device_train_batch_size=2", "--set", "trainer.logging_steps=1"]


def test_stage_with_a_bad_row_exits_2_naming_file_and_row(world, tmp_path, capsys):
    p = _write(tmp_path, [json.dumps(GOOD).encode()] * 3 + [b'{"prompt": "q", "completion": ""}'])
    code, err = cli_here(capsys, *_stage_args(p, tmp_path / "r"))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert f"{p} row 4: 'completion' is empty" in lines[0] and "on_bad_rows: skip" in lines[0]
    assert not (tmp_path / "r" / "stages" / "01_sft").exists()


def test_stage_skipping_bad_rows_counts_them(world, tmp_path, capsys):
    p = _write(tmp_path, [json.dumps(GOOD).encode()] * 4 + [b"{bad", b'{"prompt": 3, "completion": "a"}',
                                                             b'{"prompt": "\xff", "completion": "a"}'])
    code, err = cli_here(capsys, *_stage_args(p, tmp_path / "r", ", on_bad_rows: skip"))
    assert code == 0, err[-2000:]
    assert "skipped 3 bad rows" in err
    out = tmp_path / "r" / "stages" / "01_sft"
    data = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"event": "data"' in x)
    assert data["sources"][0]["rows"] == 4 and data["sources"][0]["bad_rows"] == 3
    assert [e.split(":")[0] for e in data["sources"][0]["bad_examples"]] == ["row 5", "row 6", "row 7"]
    assert json.loads((out / "DONE").read_text())["metrics"]["bad_rows"] == 3
