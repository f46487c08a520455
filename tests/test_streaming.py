"""Streamed hub data (posttrain.data_stream): a stage with a `streaming: true` source hands TRL an IterableDataset
read row by row, a `limit` bounds every read of the stream, the pre-run check reads a prefix only, and a streamed
stage without `trainer.max_steps` is refused at load. Offline: the datasets cache of tests/test_hub_pins.py."""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

import posttrain.stages  # noqa: F401
from posttrain import data as data_module
from posttrain.config import ConfigError, load_pipeline
from posttrain.data import DataError, DataSource, check_source
from posttrain.data_stream import sft_stream
from posttrain.identity import data_identity
from posttrain.pipeline import run_pipeline
from tests.test_hub_pins import C1, ROWS, dscache, hub, prepare  # noqa: F401 (fixtures)


@pytest.fixture
def reads(monkeypatch):
    """Every pass over a streamed hub dataset, as the list of rows the underlying iterator yielded in it."""
    import datasets

    real, passes = datasets.load_dataset, []

    def spy(*args, **kw):
        ds = real(*args, **kw)
        if not kw.get("streaming"):
            return ds
        assert isinstance(ds, datasets.IterableDataset)

        class Counted:
            def __iter__(self):
                passes.append([])
                for row in ds:
                    passes[-1].append(row)
                    yield row
        return Counted()

    monkeypatch.setattr(datasets, "load_dataset", spy)
    monkeypatch.setattr(data_module, "_CHECKED", {})  # a hub source checked by an earlier test is not read again
    return passes


def test_a_limit_bounds_every_read_of_the_stream(dscache, hub, reads):
    prepare(dscache, C1, ROWS, 1_000)
    dataset, stats, mode = sft_stream([DataSource(source="acme/toy", streaming=True, limit=3)], lambda m: None, 0)
    assert type(dataset).__name__ == "IterableDataset" and mode == "plain"
    assert list(islice(dataset, 6)) == ROWS[:3] * 2  # pass after pass, without end: the trainer stops at max_steps
    assert len(reads) == 3 and all(len(p) <= 3 for p in reads)  # the format peek and two passes: no fourth row
    assert stats == [{"source": "acme/toy[train]", "rows": 3, "streamed": True, "bad_rows": 0, "bad_examples": []}]


def test_streamed_bad_rows_are_skipped_and_counted_as_they_are_read(dscache, hub, reads):
    rows = ROWS[:2] + [{"prompt": "p", "completion": " "}] + ROWS[2:4]
    prepare(dscache, C1, rows, 1_000)
    src = DataSource(source="acme/toy", streaming=True, on_bad_rows="skip")
    dataset, stats, _ = sft_stream([src], lambda m: None, 0)
    assert stats[0]["rows"] is None and stats[0]["bad_rows"] == 0  # nothing read yet
    assert list(islice(dataset, 4)) == ROWS[:4]
    assert stats[0]["rows"] == 4 and stats[0]["bad_rows"] == 1 and "row 3: 'completion' is empty" in \
        stats[0]["bad_examples"][0]
    with pytest.raises(DataError, match=r"^acme/toy\[train\] row 3: 'completion' is empty"):
        next(iter(sft_stream([DataSource(source="acme/toy", streaming=True)], lambda m: None, 0)[0].skip(2)))


def test_a_stream_mixes_with_an_in_memory_source_by_seed(dscache, hub, reads, tmp_path):
    """Interleaved with the stage seed in proportion to the known counts (limit 4, the file's 2 rows): every row
    of both once per pass, in an order the seed fixes."""
    prepare(dscache, C1, ROWS, 1_000)
    local = tmp_path / "local.jsonl"
    local.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                             for i in range(2)))
    sources = [DataSource(source="acme/toy", streaming=True, limit=4), DataSource(source=str(local))]
    dataset, stats, mode = sft_stream(sources, lambda m: None, seed=5)
    got = [r["messages"][0]["content"] for r in islice(dataset, 6)]
    assert mode == "messages"  # a messages source turns the prompt/completion rows into messages too
    assert sorted(got) == sorted(["p0", "p1", "p2", "p3", "q0", "q1"])
    assert got == [r["messages"][0]["content"] for r in islice(sft_stream(sources, lambda m: None, seed=5)[0], 6)]
    assert [s["source"] for s in stats] == ["acme/toy[train]", str(local)]
    replay = ([{"prompt": "r", "completion": "s"}], [{"source": "replay:a", "rows": 1, "bad_rows": 0}])
    dataset, stats, _ = sft_stream(sources, lambda m: None, seed=5, extra=replay)
    assert sorted(r["messages"][0]["content"] for r in islice(dataset, 7)) == sorted(got + ["r"])
    assert [s["source"] for s in stats] == ["acme/toy[train]", str(local), "replay:a"]


def test_the_pre_run_check_reads_a_prefix_of_a_stream(dscache, hub, reads, monkeypatch):
    prepare(dscache, C1, ROWS, 1_000)
    monkeypatch.setattr(data_module, "PREFIX_ROWS", 5)
    logs: list[str] = []
    stats = check_source(DataSource(source="acme/toy", streaming=True), "sft", logs.append)
    assert [len(p) for p in reads] == [5] and stats["rows"] == 5
    assert logs == ["data: checked acme/toy[train]: 5 rows of a prefix (streamed: its first 5 read)"]
    check_source(DataSource(source="acme/toy", streaming=True, limit=2), "sft", logs.append)
    assert [len(p) for p in reads] == [5, 2]


def test_a_streamed_source_is_identified_without_reading_it(dscache, hub, monkeypatch):
    import datasets

    prepare(dscache, C1, ROWS, 1_000)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("identity read the dataset"))
    stage = load_pipeline(None, data=_sft({"source": "acme/toy", "streaming": True}, max_steps=2)).stages[0]
    assert data_identity(stage) == [f"hub:acme/toy@{C1}:None:train"]


def _sft(src: dict, kind: str = "sft", **trainer) -> dict:
    return {"eval": {"enabled": False}, "stages": [{"name": "s", "kind": kind, "data": [src], "trainer": trainer}]}


def test_a_streamed_stage_needs_max_steps_and_a_kind_that_streams():
    src = {"source": "acme/toy", "streaming": True}
    with pytest.raises(ConfigError, match=r"stages\[0\]: trainer\.max_steps: data\[0\] streams, and a stream has "
                                          r"no length to count epochs in; set trainer\.max_steps"):
        load_pipeline(None, data=_sft(src))
    with pytest.raises(ConfigError, match=r"stages\[0\]: data\[0\]\.streaming: the kto kind cannot train on a "
                                          r"stream \(it reorders all its rows"):
        load_pipeline(None, data=_sft(src, "kto", max_steps=2))
    with pytest.raises(ConfigError, match=r"stages\[0\]: data\[0\]\.streaming: the orpo kind cannot train on a "
                                          r"stream \(TRL's ORPOTrainer cannot prepare an IterableDataset\)"):
        load_pipeline(None, data=_sft(src, "orpo", max_steps=2))
    load_pipeline(None, data=_sft(src, max_steps=2))
    load_pipeline(None, data=_sft(src, "dpo", max_steps=2))


def test_a_streamed_sft_stage_trains_on_an_iterable_dataset(dscache, hub, reads, world, tmp_path, monkeypatch):
    """End to end: TRL's SFTTrainer gets an IterableDataset (a stream mixed with a local chat file), trains
    max_steps steps on it (every parameter it trains changes) and never reads past the stream's limit."""
    import datasets
    import torch
    import trl
    from safetensors.torch import load_file

    from posttrain.world.tuning import world_trainer

    prepare(dscache, C1, ROWS, 1_000)
    local = tmp_path / "local.jsonl"
    local.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                             for i in range(2)))  # messages: the stream's rows become messages too
    seen: dict = {}

    class Spy(trl.SFTTrainer):
        def __init__(self, *args, **kw):
            seen["dataset"] = kw["train_dataset"]
            seen["before"] = {n: p.detach().clone() for n, p in kw["model"].named_parameters()}
            super().__init__(*args, **kw)

    monkeypatch.setattr(trl, "SFTTrainer", Spy)
    trainer = world_trainer("sft", max_steps=3, per_device_train_batch_size=2, logging_steps=1, save_steps=100)
    data = {"eval": {"enabled": False}, "stages": [
        {"name": "s", "kind": "sft", "trainer": trainer,
         "data": [{"source": "acme/toy", "streaming": True, "limit": 4}, {"source": str(local)}]}]}
    logs: list[str] = []
    run_pipeline(load_pipeline(None, data=data), tmp_path / "r", logs.append)
    assert isinstance(seen["dataset"], datasets.IterableDataset)
    assert any("checked acme/toy[train]: 4 rows of a prefix" in line for line in logs)
    assert reads and all(len(p) <= 4 for p in reads)
    stage = tmp_path / "r" / "stages" / "01_s"
    after = load_file(str(stage / "model" / "model.safetensors"))
    changed = [n for n, p in seen["before"].items() if n in after and not torch.equal(p, after[n].to(p.dtype))]
    assert len(changed) == len([n for n in seen["before"] if n in after]), "a trained parameter did not change"
    events = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e and "step" in e][-1] == 3
    sources = next(e["sources"] for e in events if e.get("event") == "data")
    assert [(s["source"], s.get("streamed")) for s in sources] == [("acme/toy[train]", True), (str(local), None)]


class _Stop(RuntimeError):
    pass


def _streamed_run(tmp_path: Path, run: str, stop_at: int | None, monkeypatch, steps: int,
                  logs: list[str] | None = None) -> dict:
    """Run a streamed SFT stage of `steps` steps (a pass of the stream is 3 batches), checkpointing every 2
    steps; `stop_at`: fail the stage after that step. Returns the trained weights ({} when stopped)."""
    import trl
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from posttrain.world.tuning import world_trainer

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == stop_at:
                raise _Stop(f"stopped after step {stop_at}")

    real = getattr(trl.SFTTrainer, "real", trl.SFTTrainer)  # not an earlier run's Spy

    class Spy(real):
        def __init__(self, *args, **kw):
            super().__init__(*args, **{**kw, "callbacks": [*kw["callbacks"], StopAt()]})

    Spy.real = real

    monkeypatch.setattr(trl, "SFTTrainer", Spy)
    trainer = world_trainer("sft", max_steps=steps, per_device_train_batch_size=2, logging_steps=1, save_steps=2,
                            warmup_steps=0)
    data = {"eval": {"enabled": False}, "stages": [
        {"name": "s", "kind": "sft", "trainer": trainer, "data": [
            {"source": "acme/toy", "streaming": True, "limit": 4}, {"source": str(tmp_path / "local.jsonl")}]}]}
    try:
        run_pipeline(load_pipeline(None, data=data), tmp_path / run, (logs if logs is not None else []).append)
    except _Stop:
        return {}
    return load_file(str(tmp_path / run / "stages" / "01_s" / "model" / "model.safetensors"))


def test_a_resumed_streamed_stage_trains_the_same_weights(dscache, hub, world, tmp_path, monkeypatch):
    """The HF Trainer resumes an IterableDataset by reading and dropping the batches the checkpoint trained
    (accelerate's skip_first_batches). The stream is one endless pass (posttrain.data_stream._passes), so a run
    stopped after step 5 and resumed from checkpoint-4, in the stream's second pass (3 batches a pass), ends with
    the weights of a run never stopped (without it, the trainer would start the second pass over)."""
    import torch

    prepare(dscache, C1, ROWS, 1_000)
    (tmp_path / "local.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                                  for i in range(2)))
    whole = _streamed_run(tmp_path, "whole", None, monkeypatch, steps=6)
    assert _streamed_run(tmp_path, "cut", 5, monkeypatch, steps=6) == {}
    logs: list[str] = []
    resumed = _streamed_run(tmp_path, "cut", None, monkeypatch, steps=6, logs=logs)
    assert any("resuming from" in line and line.endswith("checkpoint-4") for line in logs), logs
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_replay_of_an_unbounded_stream_is_refused_and_of_a_bounded_one_kept():
    def stages(limit):
        src = {"source": "acme/toy", "streaming": True, **({"limit": limit} if limit else {})}
        return {"eval": {"enabled": False}, "stages": [
            {"name": "a", "kind": "sft", "data": [src], "trainer": {"max_steps": 2}},
            {"name": "b", "kind": "sft", "replay": [{"from": "a", "rows": 2}]}]}

    with pytest.raises(ConfigError, match=r"stages\[1\]\.replay\[0\]\.from: stage 'a' streams its data\[0\] without "
                                          r"limit, and replay reads the rows it mixes in into memory"):
        load_pipeline(None, data=stages(None))
    assert load_pipeline(None, data=stages(3)).stages[1].replay[0].sources()[0].limit == 3


def test_a_streamed_dpo_stage_trains_on_an_iterable_dataset(dscache, hub, reads, world, tmp_path, monkeypatch):
    """DPO takes the same stream (pairs converted row by row as posttrain.stages.preference converts them)."""
    import datasets
    import trl

    from posttrain.world.tuning import world_trainer

    pairs = [{"prompt": f"{i} + 1 =", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(8)]
    prepare(dscache, C1, pairs, 1_000)
    seen: dict = {}

    class Spy(trl.DPOTrainer):
        def __init__(self, *args, **kw):
            seen["dataset"] = kw["train_dataset"]
            super().__init__(*args, **kw)

    monkeypatch.setattr(trl, "DPOTrainer", Spy)
    trainer = world_trainer("dpo", max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_steps=100)
    data = {"eval": {"enabled": False}, "stages": [
        {"name": "d", "kind": "dpo", "trainer": trainer, "max_prompt_length": 8,
         "data": [{"source": "acme/toy", "streaming": True, "limit": 3}]}]}
    logs: list[str] = []
    run_pipeline(load_pipeline(None, data=data), tmp_path / "r", logs.append)
    assert isinstance(seen["dataset"], datasets.IterableDataset)
    assert reads and all(len(p) <= 3 for p in reads)
    assert any("keeping the last 8 tokens of longer prompts as the stream is read" in line for line in logs)
    events = [json.loads(x) for x in (tmp_path / "r" / "stages" / "01_d" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e and "step" in e][-1] == 2
