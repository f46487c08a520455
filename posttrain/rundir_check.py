"""Which folders a pipeline may run into: a run dir holds one pipeline, and posttrain writes into no folder it
did not make (see posttrain/rundir.py for the layout and the marker).

`check_run_dir` is asked before anything is written (by the CLI before it checks the inputs, and by the
pipeline before it takes the lock). It refuses `/` and the home folder always; a non-empty folder that is not a
run dir (`is_run_dir`: the marker, or the layout of a run dir from before the marker); and the run dir of
another pipeline: another name, or another stage name or kind at some position (a changed config of the same
pipeline, or one with stages added or removed at the end, is the same pipeline: it reruns and resumes there).
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from posttrain.rundir import MARKER, RunDirRefused

# A finished stage folder (NN_<name>) or one in progress (.NN_<name>.tmp); not the set-aside ones.
_STAGE_FOLDER = re.compile(r"^(\d\d)_(.+)$|^\.(\d\d)_(.+)\.tmp$")


def is_run_dir(root: Path) -> bool:
    """Whether posttrain made this folder: its marker, only a LOCK (a run stopped before it wrote anything
    else), or the layout of a run dir made before the marker existed (`_old_layout`)."""
    root = Path(root)
    names = {p.name for p in root.iterdir()}
    return MARKER in names or names == {"LOCK"} or _old_layout(root, names)


# What posttrain leaves under stages/: NN_<name>, .NN_<name>.tmp, .discarded-<h>, .old-<pid> folders.
_STAGES_ENTRY = re.compile(r"^\.?\d\d_.+$")


def _old_layout(root: Path, names: set[str]) -> bool:
    """A run dir of a version without the marker: the pipeline.yaml posttrain writes (the resolved config: every
    eval key and every stage named, which a hand-written pipeline file does not have) beside LOCK or a stages/
    folder holding stage folders only. A user's own pipeline.yaml and stages/ do not pass for one."""
    if "pipeline.yaml" not in names:
        return False
    try:
        data = yaml.safe_load((root / "pipeline.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    resolved = (isinstance(data, dict) and {"name", "seed", "eval", "stages"} <= set(data)
                and isinstance(data["eval"], dict) and {"enabled", "suite", "limit", "backend"} <= set(data["eval"])
                and isinstance(data["stages"], list)
                and all(isinstance(s, dict) and s.get("name") and s.get("kind") for s in data["stages"]))
    if not resolved:
        return False
    stages = root / "stages"
    if stages.is_dir():
        return all(p.is_dir() and _STAGES_ENTRY.match(p.name) for p in stages.iterdir())
    return "LOCK" in names


def check_run_dir(root: Path, name: str, stages: list[tuple[str, str]], overwrite: bool = False) -> bool:
    """Refuse (RunDirRefused, one line) a run dir this pipeline (`name`, its stages' (name, kind) in order) must
    not write: `/`, the home folder, a non-empty folder posttrain did not make, or the run dir of another
    pipeline unless `overwrite`. True when it holds another pipeline that `overwrite` replaces (the caller
    clears it once it holds the lock), False when the pipeline may run into it as it is."""
    root = Path(root)
    real = root.expanduser().resolve()
    if real == Path("/") or real == Path.home().resolve():
        where = "the file system root" if real == Path("/") else "your home folder"
        raise RunDirRefused(f"run dir {root} is {where}: a run writes and deletes files in its run dir; name a "
                            "folder of its own (e.g. runs/<name>)")
    if not real.is_dir() or not any(real.iterdir()):
        return False
    if not is_run_dir(real):
        shown = sorted(p.name for p in real.iterdir())
        listing = ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
        raise RunDirRefused(f"run dir {root} is a folder posttrain did not make (it holds {listing}, and no "
                            f"{MARKER}): a run writes and deletes files in its run dir; give a new or empty folder")
    held_name, held = _holds(real)
    clash = _clash(real, held_name, held, name, stages)
    if clash is None:
        return False
    if overwrite:
        return True
    raise RunDirRefused(f"run dir {root} holds {clash}; this command runs pipeline {name!r} "
                        f"({_describe(stages)}): give another --run-dir (or none, for a new one), or add --overwrite "
                        "to replace that run")


def _holds(root: Path) -> tuple[str | None, list[tuple[str, str]]]:
    """The pipeline name and the stages' (name, kind) that the run dir's pipeline.yaml records."""
    try:
        data = yaml.safe_load((root / "pipeline.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None, []
    if not isinstance(data, dict):
        return None, []
    stages = [(str(s.get("name")), str(s.get("kind"))) for s in data.get("stages") or [] if isinstance(s, dict)]
    return (str(data["name"]) if "name" in data else None), stages


def _clash(root: Path, held_name: str | None, held: list[tuple[str, str]], name: str,
           stages: list[tuple[str, str]]) -> str | None:
    """What the run dir holds, when it is not this pipeline (None when it is, or may be: extended, cut short)."""
    what = f"pipeline {held_name!r} ({_describe(held)})"
    if held_name is not None and held_name != name:
        return what
    if any(a != b for a, b in zip(held, stages)):
        return what
    folders = sorted(p.name for p in root.joinpath("stages").glob("*") if p.is_dir())
    for folder in folders:  # stage folders pipeline.yaml may not know of (written by a run of another pipeline)
        m = _STAGE_FOLDER.match(folder)
        if m is None:
            continue
        index, stage = int(m.group(1) or m.group(3)), m.group(2) or m.group(4)
        if 1 <= index <= len(stages) and stage != stages[index - 1][0]:
            return f"stages/{folder}, not this pipeline's stage {index} ({stages[index - 1][0]})"
    return None


def _describe(stages: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{i:02d}_{n}: {k}" for i, (n, k) in enumerate(stages[:4], start=1))
    return (shown + (f", ... {len(stages)} stages" if len(stages) > 4 else "")) or "no stages recorded"
