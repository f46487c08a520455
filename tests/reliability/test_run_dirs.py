"""Issue 18 (run dirs) and issue 20 item 4: a run dir holds one pipeline, and `--run-dir` never writes into a
folder posttrain did not make.

* A stage or pipeline run into the run dir of another pipeline (another name, or other stage names or kinds)
  exits 2 naming what the run dir holds, and leaves it byte-identical; `--overwrite` replaces that run.
* The same pipeline with a changed config, or with a stage added at the end, still reruns and resumes into it
  (the contract of the README's "Rerunning and resuming"; tests/reliability/test_rerun.py covers more).
* A non-empty folder that is not a run dir, `/` and the home folder are refused, and nothing in them changes.
  A run dir made before the marker existed (pipeline.yaml beside stages/) is still recognised.
* Default run dir names are unique, even for runs started in the same second.

The runs are merges of tiny local models (a second each), in this process.
"""
import hashlib
from pathlib import Path

import pytest
import yaml

from posttrain.rundir import MARKER, default_run_dir, new_run_dir
from tests.reliability.conftest import cli_here, error_lines


def _tree(root: Path) -> dict[str, str]:
    """Every path under `root` with the sha256 of its bytes (folders as "dir"): byte-identity of a folder."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _pipeline(tmp_path, merge_trio, name: str, stages: list[str], kind: str = "merge") -> str:
    base, a, b = merge_trio
    merge = {"kind": "merge", "method": "task_arithmetic", "base": str(base)}
    entries = [{"name": s, **({**merge, "models": [{"model": str(a if i % 2 == 0 else b)}]} if kind == "merge"
                              else {"kind": kind, "model": str(a)})} for i, s in enumerate(stages)]
    path = tmp_path / f"{name}-{'-'.join(stages)}-{kind}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "eval": {"enabled": False}, "stages": entries}))
    return str(path)


@pytest.fixture
def finished(merge_trio, tmp_path, capsys) -> Path:
    run_dir = tmp_path / "run"
    code, err = cli_here(capsys, "run", _pipeline(tmp_path, merge_trio, "p", ["m"]), "--run-dir", str(run_dir))
    assert code == 0, err[-2000:]
    assert (run_dir / MARKER).is_file() and (run_dir / "stages" / "01_m" / "DONE").is_file()
    return run_dir


@pytest.mark.parametrize("other", ["stage-sft", "another-name", "another-kind", "another-stage-name"])
def test_another_pipeline_into_a_finished_run_dir_exits_2_and_changes_nothing(other, finished, merge_trio,
                                                                              tmp_path, capsys):
    before = _tree(finished)
    if other == "stage-sft":
        args = ["stage", "sft", "--set", "eval.enabled=false"]
    else:
        name, stages, kind = {"another-name": ("q", ["m"], "merge"), "another-kind": ("p", ["m"], "sft"),
                              "another-stage-name": ("p", ["n"], "merge")}[other]
        args = ["run", _pipeline(tmp_path, merge_trio, name, stages, kind)]
    code, err = cli_here(capsys, *args, "--run-dir", str(finished))
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert f"run dir {finished} holds pipeline 'p' (01_m: merge)" in lines[0] and "--overwrite" in lines[0]
    assert _tree(finished) == before


def test_overwrite_replaces_the_other_pipelines_run(finished, merge_trio, tmp_path, capsys):
    (finished / "notes.md").write_text("the user's own file in a run dir\n")
    code, err = cli_here(capsys, "run", _pipeline(tmp_path, merge_trio, "q", ["n"]), "--run-dir", str(finished),
                         "--overwrite")
    assert code == 0, err[-2000:]
    assert "deleted the other pipeline's" in err
    assert sorted(p.name for p in (finished / "stages").iterdir()) == ["01_n"]
    assert yaml.safe_load((finished / "pipeline.yaml").read_text())["name"] == "q"
    assert (finished / "notes.md").is_file()  # only what a run writes is deleted


def test_the_same_pipeline_reruns_and_extends_into_its_run_dir(finished, merge_trio, tmp_path, capsys):
    code, err = cli_here(capsys, "run", _pipeline(tmp_path, merge_trio, "p", ["m"]), "--run-dir", str(finished))
    assert code == 0 and "[01 m] done already" in err, err[-2000:]
    code, err = cli_here(capsys, "run", _pipeline(tmp_path, merge_trio, "p", ["m", "m2"]), "--run-dir",
                         str(finished))
    assert code == 0 and "[01 m] done already" in err and "[02 m2] merge" in err, err[-2000:]


def test_a_run_dir_made_before_the_marker_is_still_a_run_dir(finished, merge_trio, tmp_path, capsys):
    (finished / MARKER).unlink()  # what an earlier version left: pipeline.yaml, LOCK, stages/
    code, err = cli_here(capsys, "run", _pipeline(tmp_path, merge_trio, "p", ["m"]), "--run-dir", str(finished))
    assert code == 0 and "[01 m] done already" in err, err[-2000:]
    assert (finished / MARKER).is_file()


def _user_folder(root: Path) -> Path:
    """A folder of the user's own, with the names a run dir uses."""
    (root / "stages").mkdir(parents=True)
    (root / "stages" / "notes.txt").write_text("mine\n")
    (root / "pipeline.yaml").write_text("name: my own file\n")
    (root / "error.log").write_text("my log\n")
    return root


@pytest.mark.parametrize("how", ["path", "dot"])
def test_a_user_folder_is_refused_and_left_as_it_was(how, merge_trio, tmp_path, capsys, monkeypatch):
    folder = _user_folder(tmp_path / "mine")
    pipeline = _pipeline(tmp_path, merge_trio, "p", ["m"])
    if how == "dot":  # `posttrain run pipeline.yaml --run-dir .` in the folder that holds the pipeline
        (folder / "pipeline.yaml").write_text(Path(pipeline).read_text())
        monkeypatch.chdir(folder)
        pipeline = "pipeline.yaml"
    before = _tree(folder)
    code, err = cli_here(capsys, "run", pipeline, "--run-dir", "." if how == "dot" else str(folder), "--overwrite")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "is a folder posttrain did not make" in lines[0] and "error.log, pipeline.yaml, stages" in lines[0]
    assert _tree(folder) == before


@pytest.mark.parametrize("where", ["root", "home"])
def test_root_and_home_are_refused_outright(where, merge_trio, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    target = "/" if where == "root" else str(home)
    code, err = cli_here(capsys, "run", _pipeline(tmp_path, merge_trio, "p", ["m"]), "--run-dir", target)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert ("the file system root" if where == "root" else "your home folder") in lines[0]
    assert list(home.iterdir()) == []  # an empty home folder too: nothing written


def test_an_empty_folder_becomes_a_run_dir(merge_trio, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = cli_here(capsys, "run", _pipeline(tmp_path, merge_trio, "p", ["m"]), "--run-dir",
                         str(tmp_path / "empty"))
    assert code == 0, err[-2000:]
    assert (tmp_path / "empty" / MARKER).is_file()


def test_default_run_dir_names_are_unique_within_a_second(tmp_path, monkeypatch):
    import posttrain.rundir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(posttrain.rundir, "default_run_dir", lambda name, root: root / f"20260101-000000-{name}")
    names = [new_run_dir("p").name for _ in range(3)]  # three runs started in the same second
    assert names == ["20260101-000000-p", "20260101-000000-p-2", "20260101-000000-p-3"]
    assert all((tmp_path / "runs" / n / MARKER).is_file() for n in names)
    assert default_run_dir("p", Path("runs")).parent == Path("runs")
