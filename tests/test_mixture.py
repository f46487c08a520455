"""Mixtures and replay (posttrain/mixture.py): `fraction:`/`rows:` sampling of a source with the stage's seed, and
`replay:` of an earlier stage's data into a later SFT, DPO, KTO or GRPO stage (in its dataset and its data hash;
refused at load from a stage whose rows have another shape)."""
import json
from collections import Counter

import pytest

from posttrain.config import load_pipeline
from posttrain.data import DataSource, load_rows
from posttrain.mixture import sample_rows
from posttrain.identity import data_identity as _data_identity
from posttrain.schema import ConfigError


def _jsonl(tmp_path, name: str, n: int, tag: str):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"prompt": f"{tag}{i}", "completion": f"c{i}"}) + "\n" for i in range(n)))
    return str(p)


def test_fraction_and_rows_counts_and_seed(tmp_path):
    rows = list(range(10))
    half = sample_rows(rows, 0.5, None, seed=0, salt="s")
    assert len(half) == 5 and len(set(half)) == 5 and set(half) <= set(rows)
    assert sample_rows(rows, 0.5, None, seed=0, salt="s") == half  # same seed, same rows and order
    assert sample_rows(rows, 0.5, None, seed=1, salt="s") != half  # another seed, another draw
    up = Counter(sample_rows(rows, None, 25, seed=0, salt="s"))
    assert sum(up.values()) == 25 and set(up) == set(rows) and set(up.values()) == {2, 3}
    assert Counter(sample_rows(rows, 2.0, None, seed=3, salt="s")) == Counter({r: 2 for r in rows})
    assert sample_rows(rows, None, None, seed=0, salt="s") == rows  # neither set: file order, untouched
    assert len(sample_rows(rows, 0.01, None, seed=0, salt="s")) == 1  # a share never rounds a source away


def test_source_sampling_after_limit(tmp_path):
    path = _jsonl(tmp_path, "a.jsonl", 40, "a")
    rows, stats = load_rows(DataSource(source=path, limit=20, fraction=0.5), "sft", seed=7)
    assert stats["rows"] == 10 and {r["prompt"] for r in rows} <= {f"a{i}" for i in range(20)}  # limit: first 20
    again, _ = load_rows(DataSource(source=path, limit=20, fraction=0.5), "sft", seed=7)
    assert again == rows
    up, _ = load_rows(DataSource(source=path, rows=100), "sft", seed=7)
    assert len(up) == 100
    assert "fraction" not in DataSource(source=path).model_dump()  # unset: old configs keep their hashes


def _pipe(tmp_path, replay=None, arith_limit=None):
    first = {"source": _jsonl(tmp_path, "a.jsonl", 50, "a")}
    if arith_limit:
        first["limit"] = arith_limit
    second = {"name": "second", "kind": "sft", "model": "${stages.first.model}",
              "data": [{"source": _jsonl(tmp_path, "b.jsonl", 30, "b")}]}
    if replay is not None:
        second["replay"] = replay
    return load_pipeline(None, data={"stages": [{"name": "first", "kind": "sft", "data": [first]}, second]})


def test_replay_rows_in_the_stage_dataset(tmp_path, monkeypatch):
    from posttrain.stages import sft
    from posttrain.stages.base import StageContext

    seen = {}
    monkeypatch.setattr(sft, "load_tokenizer", lambda *a: object())  # plain rows: no chat template read
    monkeypatch.setattr(sft, "run_trl_stage", lambda cfg, ctx, trl, dataset, stats, *a, **k: seen.update(
        rows=dataset.to_list(), stats=stats))
    stage = _pipe(tmp_path, replay=[{"from": "first", "fraction": 0.1}]).stages[1]
    ctx = StageContext(run_dir=tmp_path, work_dir=tmp_path, index=2, seed=0, input_model="m", resolve=str)
    sft.run(stage, ctx)
    prompts = [r["prompt"] for r in seen["rows"]]
    assert sum(p.startswith("b") for p in prompts) == 30
    replayed = [p for p in prompts if p.startswith("a")]
    assert len(replayed) == 5 and len(set(replayed)) == 5  # 10% of the first stage's 50 rows
    assert seen["stats"][-1] == {"source": "replay:first", "rows": 5, "bad_rows": 0, "bad_examples": []}
    seen.clear()
    sft.run(stage, ctx)
    assert [r["prompt"] for r in seen["rows"]] == prompts  # the same seed replays the same rows


def test_replay_changes_the_data_hash_and_round_trips(tmp_path):
    plain = _pipe(tmp_path).stages[1]
    replay = _pipe(tmp_path, replay=[{"from": "first", "rows": 8}]).stages[1]
    limited = _pipe(tmp_path, replay=[{"from": "first", "rows": 8}], arith_limit=10).stages[1]
    ids = [json.dumps(_data_identity(s)) for s in (plain, replay, limited)]
    assert len(set(ids)) == 3  # replay, and a change to the replayed stage's data, each change the hash
    assert _data_identity(plain) == [_data_identity(plain)[0]]  # no replay: the identity it always had
    assert "replay" not in plain.model_dump()
    dumped = replay.model_dump()
    assert dumped["replay"] == [{"from": "first", "rows": 8}]
    assert type(replay).model_validate(dumped).model_dump() == dumped  # a saved config.yaml reads back


@pytest.mark.parametrize("replay, source, want", [
    ([{"from": "frist", "fraction": 0.1}], {}, r"stages\[1\]\.replay\[0\]\.from: no earlier stage 'frist' \(did you mean 'first'\?\)"),
    ([{"from": "second", "fraction": 0.1}], {}, r"stages\[1\]\.replay\[0\]\.from: 'second' is not an earlier stage"),
    ([{"from": "first"}], {}, r"stages\[1\]\.replay\[0\]: .*set fraction .* or rows"),
    ([{"from": "first", "fraction": 0.1, "rows": 3}], {}, r"stages\[1\]\.replay\[0\]: .*not both"),
    (None, {"fraction": 0}, r"stages\[0\]\.data\[0\]\.fraction: .*greater than 0"),
    (None, {"fraction": 0.5, "rows": 3}, r"stages\[0\]\.data\[0\]: .*set fraction or rows, not both"),
])
def test_config_errors_are_one_line(tmp_path, replay, source, want):
    data = {"stages": [
        {"name": "first", "kind": "sft", "data": [{"source": _jsonl(tmp_path, "a.jsonl", 5, "a"), **source}]},
        {"name": "second", "kind": "sft", "data": [{"source": _jsonl(tmp_path, "b.jsonl", 5, "b")}],
         **({"replay": replay} if replay is not None else {})}]}
    with pytest.raises(ConfigError, match=want) as e:
        load_pipeline(None, data=data)
    assert "\n" not in str(e.value)


# Rows of each shape (posttrain.data), tagged so a replayed row is told from the stage's own by its prompt.
ROWS = {"sft": lambda tag, i: {"prompt": f"{tag}{i}", "completion": f"c{i}"},
        "preference": lambda tag, i: {"prompt": f"{tag}{i}", "chosen": f"y{i}", "rejected": f"n{i}"},
        "prompt": lambda tag, i: {"prompt": f"{tag}{i}", "answer": str(i)}}
SHAPE = {"sft": "sft", "dpo": "preference", "kto": "preference", "grpo": "prompt", "orpo": "preference",
         "simpo": "preference", "reward": "preference", "rloo": "prompt"}


def _rows(tmp_path, name: str, n: int, tag: str, shape: str) -> str:
    p = tmp_path / name
    p.write_text("".join(json.dumps(ROWS[shape](tag, i)) + "\n" for i in range(n)))
    return str(p)


def _kind_pipe(tmp_path, first_kind: str, kind: str, replay=None):
    grpo = {"trainer": {"per_device_train_batch_size": 2}, "num_generations": 2}  # a batch the group size fits
    stages = []
    for name, k, n, tag in (("first", first_kind, 40, "a"), ("second", kind, 20, "b")):
        stage = {"name": name, "kind": k, "data": [{"source": _rows(tmp_path, f"{tag}.jsonl", n, tag, SHAPE[k])}],
                 **(grpo if k == "grpo" else {})}
        stages.append(stage)
    if replay is not None:
        stages[1]["replay"] = replay
    return load_pipeline(None, data={"stages": stages})


class _Seen(Exception):
    pass


@pytest.mark.parametrize("first_kind, kind", [("dpo", "dpo"), ("kto", "kto"), ("dpo", "kto"), ("kto", "dpo"),
                                              ("grpo", "grpo"), ("dpo", "orpo"), ("orpo", "simpo"), ("simpo", "reward"),
                                              ("grpo", "rloo")])
def test_replayed_rows_reach_the_trainers_dataset(tmp_path, monkeypatch, first_kind, kind):
    """10% of the earlier stage's 40 rows (4) beside the stage's own 20, the same on a rerun; in the data hash."""
    import importlib
    import types

    from posttrain.stages.base import StageContext

    module = importlib.import_module(f"posttrain.stages.{kind}")
    seen: list = []

    def trainer(cfg, ctx, trl, dataset, stats, *a, **k):
        seen.append(([r["prompt"] for r in dataset.to_list()], stats))
        raise _Seen  # before any model loads

    # the pairwise kinds read their tokenizer through stages.preference.preference_inputs
    owner = importlib.import_module("posttrain.stages.preference") if kind in ("dpo", "orpo", "simpo", "reward") \
        else module
    monkeypatch.setattr(owner, "load_tokenizer", lambda *a: types.SimpleNamespace(chat_template=None))
    monkeypatch.setattr(module, "run_trl_stage", trainer)
    stage = _kind_pipe(tmp_path, first_kind, kind, replay=[{"from": "first", "fraction": 0.1}]).stages[1]
    ctx = StageContext(run_dir=tmp_path, work_dir=tmp_path, index=2, seed=0, input_model="m", resolve=str)
    for _ in range(2):
        with pytest.raises(_Seen):
            module.run(stage, ctx)
    (prompts, stats), (again, _) = seen
    per_row = 2 if kind == "kto" else 1  # KTO unpairs each pair into a desirable and an undesirable row
    assert sum(p.startswith("b") for p in prompts) == 20 * per_row
    replayed = [p for p in prompts if p.startswith("a")]
    assert len(replayed) == 4 * per_row and len(set(replayed)) == 4
    assert stats[-1] == {"source": "replay:first", "rows": 4, "bad_rows": 0, "bad_examples": []}
    assert again == prompts  # the same seed replays the same rows
    if kind == "kto":  # read in order by TRL: the replayed pairs are spread through the stage's own, not appended
        assert prompts.index(replayed[0]) < 20
    plain = _kind_pipe(tmp_path, first_kind, kind).stages[1]
    assert _data_identity(plain) != _data_identity(stage) and "replay" not in plain.model_dump()


def test_dpo_replays_an_earlier_dpo_stages_pairs_not_its_rehearsal(tmp_path):
    """A DPO stage's `rehearsal:` prompts are not its `data:`: a later DPO stage with or without rehearsal replays
    the pairs alone."""
    rehearsal = [{"source": _rows(tmp_path, "r.jsonl", 5, "r", "prompt")}]
    pipe = load_pipeline(None, data={"stages": [
        {"name": "first", "kind": "dpo", "data": [{"source": _rows(tmp_path, "a.jsonl", 5, "a", "preference")}],
         "rehearsal": rehearsal},
        {"name": "second", "kind": "dpo", "data": [{"source": _rows(tmp_path, "b.jsonl", 5, "b", "preference")}],
         "rehearsal": rehearsal, "replay": [{"from": "first", "rows": 2}]}]})
    assert [s.source for s in pipe.stages[1].replay[0].sources()] == [str(tmp_path / "a.jsonl")]


@pytest.mark.parametrize("first_kind, kind, theirs, ours", [
    ("sft", "dpo", "sft", "preference"), ("dpo", "sft", "preference", "sft"), ("sft", "grpo", "sft", "prompt"),
    ("grpo", "kto", "prompt", "preference"), ("dpo", "grpo", "preference", "prompt"),
])
def test_replay_from_an_incompatible_kind_is_refused_at_load(tmp_path, first_kind, kind, theirs, ours):
    with pytest.raises(ConfigError) as e:
        _kind_pipe(tmp_path, first_kind, kind, replay=[{"from": "first", "fraction": 0.5}])
    assert str(e.value) == (f"<config>: stages[1].replay[0].from: stage 'first' ({first_kind}) trains on {theirs} rows, "
                            f"stage 'second' ({kind}) on {ours} rows; a {kind} stage replays only {ours} rows")
