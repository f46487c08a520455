"""Hub inputs pinned to a commit (posttrain.hub_pins), offline: a hub cache and a datasets cache laid out in
tmp_path as huggingface_hub and datasets lay them out, never the network.

Models: `models--<org>--<name>/refs/<revision>` holds a commit, `snapshots/<commit>/` the files. Datasets offline
load the newest prepared version `<org>___<name>/<config>/0.0.0/<commit>/` of datasets' own cache.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import posttrain.stages  # noqa: F401
from posttrain.config import ConfigError, load_pipeline
from posttrain.data import DataError, DataSource, load_rows
from posttrain.hub_pins import snapshot_identity
from posttrain.models import ModelError, resolve_model
from posttrain.identity import data_identity as _data_identity
from posttrain.pipeline import run_pipeline

C1, C2, C3 = "1" * 40, "2" * 40, "3" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache, offline (huggingface_hub reads both constants when called)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def put_model(hub: Path, repo: str, commit: str, folder: Path, ref: str | None = "main") -> Path:
    """Cache `folder` as commit `commit` of hub model `repo`, with `ref` pointing at it."""
    root = hub / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    if not snap.exists():
        shutil.copytree(folder, snap)
    if ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


def _merge(base_ref: str, model: Path) -> dict:
    return {"eval": {"enabled": False}, "stages": [
        {"name": "m", "kind": "merge", "method": "task_arithmetic", "base": base_ref,
         "models": [{"model": str(model), "weight": 0.5}]}]}


def _run(data: dict, run_dir: Path) -> tuple[list[str], str]:
    """Run; (log lines, the base folder the merge read)."""
    logs: list[str] = []
    run_pipeline(load_pipeline(None, data=data), run_dir, logs.append)
    merged = json.loads((run_dir / "stages" / "01_m" / "merge.json").read_text())
    return logs, merged["base"]["folder"]


def test_resolve_model_gives_the_snapshot_of_the_commit_main_points_at(hub, merge_trio, tmp_path):
    base, a, _ = merge_trio
    snap1 = put_model(hub, "acme/tiny", C1, base)
    assert resolve_model("acme/tiny", lambda m: None) == str(snap1)
    assert snapshot_identity(snap1) == f"hub:acme/tiny@{C1}"
    assert snapshot_identity(base) is None  # a folder of one's own keeps its content hash
    snap2 = put_model(hub, "acme/tiny", C2, a)
    assert resolve_model("acme/tiny", lambda m: None) == str(snap2)
    assert resolve_model(f"acme/tiny@{C1}", lambda m: None) == str(snap1)  # a commit pins
    with pytest.raises(ModelError, match=r"^model 'acme/tiny@v9': revision 'v9' is not in the hub cache, and "
                                         r"HF_HUB_OFFLINE is set \(cached: main\)$"):
        resolve_model("acme/tiny@v9", lambda m: None)


def test_a_stage_reruns_when_its_hub_input_moved_and_not_otherwise(hub, merge_trio, tmp_path):
    """DONE records the commit: refs/main rewritten to a new snapshot reruns the stage on it; unchanged, it is
    reused."""
    base, _, b = merge_trio
    put_model(hub, "acme/tiny", C1, base)
    data = _merge("acme/tiny", b)
    logs, folder = _run(data, tmp_path / "r")
    assert Path(folder).name == C1 and not any("done already" in line for line in logs)
    logs, _ = _run(data, tmp_path / "r")
    assert any("[01 m] done already" in line for line in logs)
    put_model(hub, "acme/tiny", C2, b)  # upstream moved: main now points at another commit
    logs, folder = _run(data, tmp_path / "r")
    assert any("[01 m] rerunning" in line for line in logs) and Path(folder).name == C2
    logs, _ = _run(data, tmp_path / "r")
    assert any("[01 m] done already" in line for line in logs)


def test_an_explicit_revision_pins(hub, merge_trio, tmp_path):
    """`@v1` (a branch or tag) reads the commit v1 points at, whatever main does; main moving reruns nothing."""
    base, a, b = merge_trio
    put_model(hub, "acme/tiny", C1, base, ref="v1")
    put_model(hub, "acme/tiny", C2, a)
    data = _merge("acme/tiny@v1", b)
    logs, folder = _run(data, tmp_path / "r")
    assert Path(folder).name == C1
    put_model(hub, "acme/tiny", C3, b)
    logs, folder = _run(data, tmp_path / "r")
    assert any("[01 m] done already" in line for line in logs)
    saved = yaml.safe_load((tmp_path / "r" / "pipeline.yaml").read_text())
    assert saved["stages"][0]["base"] == "acme/tiny@v1"


def test_a_bad_revision_is_one_line_naming_the_field(hub, merge_trio, tmp_path, cli):
    base, _, b = merge_trio
    put_model(hub, "acme/tiny", C1, base)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.base: model 'acme/tiny@nope': revision 'nope' is not in "
                                          r"the hub cache, and HF_HUB_OFFLINE is set \(cached: main\)$"):
        load_pipeline(None, data=_merge("acme/tiny@nope", b))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.base: model 'acme/tiny@': empty revision after '@'"):
        load_pipeline(None, data=_merge("acme/tiny@", b))
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"name": "p", **_merge("acme/tiny@nope", b)}))
    r = cli("run", str(cfg), "--run-dir", str(tmp_path / "r"),
            env={"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "stages[0].base: model 'acme/tiny@nope'" in r.stderr and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ datasets

ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(8)]


@pytest.fixture
def dscache(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return tmp_path / "datasets"


def prepare(cache: Path, commit: str, rows: list[dict], mtime: float) -> None:
    """Hub dataset acme/toy as datasets prepares it from `commit`: one Arrow file and its dataset_info.json."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter
    from datasets.splits import SplitDict, SplitInfo

    folder = cache / "acme___toy" / "default" / "0.0.0" / commit
    folder.mkdir(parents=True)
    info = Dataset.from_list(rows).info
    with ArrowWriter(path=str(folder / "toy-train.arrow"), features=info.features) as w:
        for row in rows:
            w.write(row)
        n, size = w.finalize()
    info.config_name, info.dataset_name = "default", "toy"
    info.splits = SplitDict({"train": SplitInfo(name="train", num_bytes=size, num_examples=n, dataset_name="toy")})
    info.write_to_directory(str(folder))
    os.utime(folder, (mtime, mtime))


def _sft(src: dict) -> dict:
    return {"eval": {"enabled": False}, "stages": [{"name": "s", "kind": "sft", "data": [src]}]}


def test_a_hub_dataset_is_identified_by_the_commit_a_load_reads(dscache, hub):
    prepare(dscache, C1, ROWS, 1_000)
    stage = load_pipeline(None, data=_sft({"source": "acme/toy", "limit": 2})).stages[0]
    before = _data_identity(stage)
    assert before == [f"hub:acme/toy@{C1}:None:train"]
    prepare(dscache, C2, ROWS[::-1], 2_000)  # a newer version: what datasets loads offline now
    assert _data_identity(stage) == [f"hub:acme/toy@{C2}:None:train"]
    rows, _ = load_rows(stage.data[0], "sft", lambda m: None)
    assert rows == [{"prompt": "p7", "completion": "c7"}, {"prompt": "p6", "completion": "c6"}]


def test_a_dataset_revision_must_be_the_cached_version_offline(dscache, hub):
    prepare(dscache, C1, ROWS, 1_000)
    load_pipeline(None, data=_sft({"source": "acme/toy", "revision": C1}))
    tag = hub / "datasets--acme--toy" / "refs"
    tag.mkdir(parents=True)
    (tag / "v1").write_text(C1)
    load_pipeline(None, data=_sft({"source": "acme/toy", "revision": "v1"}))  # a branch the hub cache knows
    with pytest.raises(ConfigError, match=rf"stages\[0\]\.data\[0\]\.revision: revision '{C2}' of dataset 'acme/toy' "
                                          rf"is not the version cached here \(commit {C1[:12]}\)"):
        load_pipeline(None, data=_sft({"source": "acme/toy", "revision": C2}))
    with pytest.raises(DataError, match="is not the version cached here"):  # a stage config checked elsewhere
        load_rows(DataSource(source="acme/toy", revision="v2"), "sft", lambda m: None)


def test_streaming_reads_the_same_rows_one_at_a_time_and_stops_at_limit(dscache, hub, monkeypatch):
    import datasets

    prepare(dscache, C1, ROWS, 1_000)
    real, read = datasets.load_dataset, []

    def spy(*args, **kw):
        ds = real(*args, **kw)
        if not kw.get("streaming"):
            return ds
        assert isinstance(ds, datasets.IterableDataset)

        class Counted:  # what the stream yielded, row by row
            def __iter__(self):
                for row in ds:
                    read.append(row)
                    yield row
        return Counted()

    monkeypatch.setattr(datasets, "load_dataset", spy)
    plain, _ = load_rows(DataSource(source="acme/toy", limit=3, rows=5), "sft", lambda m: None, seed=7)
    streamed, stats = load_rows(DataSource(source="acme/toy", limit=3, rows=5, streaming=True), "sft",
                                lambda m: None, seed=7)
    assert streamed == plain and len(streamed) == 5 and stats["rows"] == 5
    assert read == ROWS[:3]  # the fourth row was never read


def test_streaming_and_revision_refusals_name_the_field():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.data\[0\]: fraction: a streamed source is sampled from "
                                          r"the rows read, which are unbounded without limit"):
        load_pipeline(None, data=_sft({"source": "acme/toy", "streaming": True, "fraction": 0.5}))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.data\[0\]: streaming: only hub datasets have it"):
        load_pipeline(None, data=_sft({"source": "arithmetic", "streaming": True}))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.data\[0\]: revision: only hub datasets have it"):
        load_pipeline(None, data=_sft({"source": "arithmetic", "revision": "main"}))
    ok = _sft({"source": "acme/toy", "streaming": True, "rows": 9, "limit": 4})
    ok["stages"][0]["trainer"] = {"max_steps": 2}  # a streamed stage needs it (tests/test_streaming.py)
    load_pipeline(None, data=ok)
    # Unset, the new fields stay out of the dump, so DONE's config hash of every finished stage is unchanged.
    assert set(DataSource(source="acme/toy").model_dump()) == {"source", "split", "subset", "columns", "limit",
                                                               "on_bad_rows"}


def test_online_the_hub_names_the_dataset_commit_and_load_dataset_gets_it(dscache, monkeypatch):
    """Online (stubbed at huggingface_hub's and datasets' boundaries): `dataset_info(revision).sha` is the
    identity and the revision load_dataset is given; a revision the hub does not have is one line."""
    import datasets
    import huggingface_hub
    from huggingface_hub.errors import RevisionNotFoundError

    import posttrain.hub_pins

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(posttrain.hub_pins, "_ONLINE", {})
    asked, loaded = [], []

    def info(self, name, revision=None, timeout=None):
        asked.append((name, revision))
        if revision == "nope":
            raise RevisionNotFoundError("404", response=SimpleNamespace(headers={}, request=None))
        return SimpleNamespace(sha=C3)

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", info)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loaded.append(k["revision"]) or ROWS)
    src = DataSource(source="acme/toy", revision="v1", limit=2)
    assert _data_identity(SimpleNamespace(training_data=lambda: [src])) == [f"hub:acme/toy@{C3}:None:train"]
    rows, _ = load_rows(src, "sft", lambda m: None)
    assert rows == ROWS[:2] and loaded == [C3] and asked == [("acme/toy", "v1")]  # asked once per process
    with pytest.raises(DataError, match=r"^dataset 'acme/toy': the hub has no revision 'nope'$"):
        load_rows(DataSource(source="acme/toy", revision="nope"), "sft", lambda m: None)


def test_a_streamed_hub_dataset_trains_and_a_new_version_reruns_the_stage(dscache, hub, world, tmp_path):
    """End to end: an SFT stage on a streamed cached hub dataset trains on its first `limit` rows; a newer
    cached version (what datasets loads offline now) reruns it, an unchanged one does not."""
    from posttrain.world.tuning import world_trainer

    prepare(dscache, C1, ROWS, 1_000)
    trainer = world_trainer("sft", max_steps=1, per_device_train_batch_size=2, logging_steps=1)
    data = {"eval": {"enabled": False}, "stages": [
        {"name": "s", "kind": "sft", "data": [{"source": "acme/toy", "streaming": True, "limit": 4}],
         "trainer": trainer}]}
    logs: list[str] = []
    run_pipeline(load_pipeline(None, data=data), tmp_path / "r", logs.append)
    events = [json.loads(x) for x in (tmp_path / "r" / "stages" / "01_s" / "metrics.jsonl").read_text().splitlines()]
    sources = next(e["sources"] for e in events if e.get("event") == "data")
    assert [(s["source"], s["rows"], s["streamed"]) for s in sources] == [("acme/toy[train]", None, True)]
    run_pipeline(load_pipeline(None, data=data), tmp_path / "r", logs.append)
    assert any("[01 s] done already" in line for line in logs)
    prepare(dscache, C2, ROWS[::-1], 2_000)
    run_pipeline(load_pipeline(None, data=data), tmp_path / "r", logs.append)
    assert any("[01 s] rerunning" in line for line in logs)
