"""The run directory: layout, lock, atomic writes and DONE markers.

    <run-dir>/
      posttrain-run.json       marks the folder as a run dir posttrain made (rundir_check.py reads it)
      pipeline.yaml            the resolved pipeline config
      LOCK                     pid of the process that holds the run dir (flock'ed while it runs)
      stages/
        00_base/eval.json      the base model's eval (issue "Evals after every stage")
        01_<name>/             a finished stage, renamed into place from .01_<name>.tmp/
          model/               a complete HF folder: config.json, *.safetensors, tokenizer files, generation_config.json
          config.yaml          the stage's resolved config
          metrics.jsonl        training log, one JSON object a line
          eval.json            the stage model's eval, with `parents`: the rows it is built from (its lineage)
          DONE                 written last: sha256 of every model file, of the config and of the inputs
        .02_<name>.tmp/        a stage in progress (its checkpoints/ let a rerun resume)
        .02_<name>.discarded-<h>/  an attempt of another config or inputs (resumed if they come back; removed once
                               the stage is done)
        .01_<name>.old-<pid>/  a folder being replaced by a rerun (removed once the new one is in place)
      inputs/<ref>/eval.json   the eval of an input model a stage reads that is not a stage of the run (a merge's
                               `models:`, a transfer's `source_finetuned`; <ref> with unsafe characters as _)
      report/forgetting.{json,md,png}

A stage counts as done only when its folder has a DONE whose hashes match what is on disk and what the
pipeline asks for now; anything else reruns.

A run dir holds one pipeline, and posttrain writes into no folder it did not make: posttrain/rundir_check.py.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any


class RunDirLocked(RuntimeError):
    pass


class RunDirRefused(ValueError):
    """A run dir that must not be written: a user's folder, `/`, the home folder, another pipeline's run."""


MARKER = "posttrain-run.json"
# What a run writes at the top of its run dir besides LOCK (what `--overwrite` deletes).
RUN_ENTRIES = (MARKER, "pipeline.yaml", "stages", "inputs", "report", "error.log")
# `${stages.<name>.model}` anywhere in a string: a stage of the run named inside a config value.
ANY_STAGE_REF = re.compile(r"\$\{stages\.([A-Za-z0-9_.-]+)\.model\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def input_folder(ref: str) -> Path:
    """Where an input model that is not a stage of the run keeps its eval, relative to the run dir."""
    return Path("inputs") / (_UNSAFE.sub("_", ref).strip("_.")[:100] or "model")


def is_stage_ref(ref: str) -> bool:
    """True when `ref` names a stage of the run (`${stages.<name>.model}` anywhere in it)."""
    return bool(ANY_STAGE_REF.search(ref))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_folder(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (sorted)."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see old or new, never half.
    The file gets the mode `open()` gives (0o666 less the umask), so a shared run dir stays readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def replace_marked(path: Path, marker: str, text: str) -> bool:
    """Replace what lies between `<!-- {marker}:begin -->` and `<!-- {marker}:end -->` in a file (README
    tables that `make bench` and `make claims` keep current); False, file untouched, when a marker is absent."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    content = Path(path).read_text()
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    atomic_write_text(Path(path), f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
    return True


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{name}"


def new_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """Create and mark a fresh `runs/<timestamp>-<name>`; when a run started in the same second has that name,
    `<timestamp>-<name>-2`, -3, ... (mkdir claims a name atomically, so two runs never share one)."""
    first = default_run_dir(name, root)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        path = first if k == 1 else first.with_name(f"{first.name}-{k}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        mark_run_dir(path, name)
        return path
    raise RunDirRefused(f"{first}: 10,000 runs of this name started in the same second")


class CreatedRunDir:
    """A run dir this command created, to be removed again if the run stops on bad input before any stage ran,
    with `latest` pointed back where it was."""

    def __init__(self, run_dir: Path, latest_before: str | None, moved_latest: bool):
        self.run_dir, self.latest_before, self.moved_latest = run_dir, latest_before, moved_latest

    def undo(self) -> None:
        left = {p.name for p in self.run_dir.iterdir()} if self.run_dir.is_dir() else set()
        if not left <= {"LOCK", "pipeline.yaml", MARKER}:
            return  # something ran (an eval, a stage): keep it
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if not self.moved_latest:
            return
        if self.latest_before is None:
            (self.run_dir.parent / "latest").unlink(missing_ok=True)
        else:
            point_latest(self.run_dir.parent / self.latest_before)


def open_run_dir(run_dir: str | Path | None, name: str) -> tuple[Path, CreatedRunDir | None]:
    """Create the run dir: `run_dir` (the pipeline marks it once it holds its lock, so a run dir another process
    holds is left untouched), or a new marked `runs/<timestamp>-<name>` that `latest` points at; with an undo
    handle when this call created it."""
    if run_dir:
        path = Path(run_dir)
        existed = path.exists()
        path.mkdir(parents=True, exist_ok=True)
        return path, None if existed else CreatedRunDir(path, None, False)
    link = Path("runs") / "latest"
    before = os.readlink(link) if link.is_symlink() else None
    path = new_run_dir(name)
    point_latest(path)
    return path, CreatedRunDir(path, before, True)


def mark_run_dir(root: Path, name: str) -> None:
    """Write the marker that says posttrain made this folder (once; a run dir of an older version gets one)."""
    path = Path(root) / MARKER
    if not path.is_file():
        atomic_write_json(path, {"posttrain_run_dir": 1, "pipeline": name,
                                 "created": _dt.datetime.now().isoformat(timespec="seconds")})


def point_latest(run_dir: Path) -> None:
    """Make `<parent>/latest` a symlink to run_dir (replaced atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.tmp-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError:
        pass  # a file system without symlinks keeps working, just without `latest`


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.stages = self.root / "stages"
        self._lock_fd: int | None = None

    # ---- lock -------------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive flock on LOCK for this process's life; a second process fails at once."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        self._refuse_if_held(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def check_free(self) -> None:
        """RunDirLocked when another process holds the run dir; writes nothing (so the CLI can say so before it
        reads a single input)."""
        try:
            fd = os.open(self.root / "LOCK", os.O_RDONLY)
        except OSError:
            return  # no LOCK (or unreadable): lock() decides
        self._refuse_if_held(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _refuse_if_held(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirLocked(f"run dir {self.root} is in use by another posttrain process (pid {holder})") from None

    def clear(self) -> list[str]:
        """Delete what a run writes in the run dir (not LOCK, held by this process, nor files of the user's):
        `--overwrite` replacing the run of another pipeline. Returns the names deleted."""
        gone = sorted(p.name for p in self.root.iterdir() if p.name in RUN_ENTRIES)
        for name in gone:
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return gone

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- stage folders ----------------------------------------------------------------------------------------
    def stage_dir(self, index: int, name: str) -> Path:
        return self.stages / f"{index:02d}_{name}"

    def work_dir(self, index: int, name: str) -> Path:
        return self.stages / f".{index:02d}_{name}.tmp"

    @staticmethod
    def prepare_work_dir(work: Path, config_hash: str, inputs_hash: str, log=print) -> None:
        """Keep a half-done work folder (its checkpoints) only when the same config on the same inputs started
        it, so that a resume continues the same training (checkpoints trained on an earlier input model, data
        file or seed would make the stage descend from inputs it no longer has).

        Another attempt with checkpoints is set aside as `.NN_<name>.discarded-<attempt>` (one folder per
        config and inputs, logged) and one set aside earlier for the current config and inputs is moved back:
        a mistyped `--set`, interrupted, then the right command again resumes the original checkpoints. An
        attempt without checkpoints holds nothing to keep. All are removed when the stage is done."""
        marker = work / "ATTEMPT.json"
        old = _read_json(marker) if work.exists() else {}
        # A marker from before inputs were recorded keeps its folder when the config matches, as it did.
        if work.exists() and (old.get("config_sha256") != config_hash
                              or old.get("inputs_sha256", inputs_hash) != inputs_hash):
            why = "config" if old.get("config_sha256") != config_hash else "inputs"
            if any((work / "checkpoints").glob("checkpoint-*")):
                aside = _discarded(work, old.get("config_sha256", ""), old.get("inputs_sha256", ""))
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(work, aside)
                log(f"{work.name}: its {why} changed since the interrupted attempt; its checkpoints are kept in "
                    f"{aside} until this stage finishes (rerun with the old config to resume them)")
            else:
                shutil.rmtree(work)
        kept = _discarded(work, config_hash, inputs_hash)
        if not work.exists() and kept.is_dir():
            os.replace(kept, work)
            log(f"{work.name}: resuming the attempt set aside earlier for this config and inputs")
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"config_sha256": config_hash, "inputs_sha256": inputs_hash})

    def finalize(self, work: Path, final: Path) -> None:
        """Rename the finished work folder into place, replacing an older (not done) folder of the same name.

        The older folder is moved aside first (`.NN_<name>.old-<pid>`): a kill between the two renames
        leaves it there, so older leftovers of this stage are removed here too.
        """
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(work, final)
        else:
            os.replace(work, final)
        _fsync_dir(final.parent)
        leftovers = [*final.parent.glob(f".{final.name}.old-*"), *final.parent.glob(f".{final.name}.discarded-*")]
        for leftover in leftovers:
            shutil.rmtree(leftover, ignore_errors=True)

    @staticmethod
    def write_done(final: Path, config_hash: str, inputs_hash: str, extra: dict | None = None) -> dict:
        done = {
            "config_sha256": config_hash,
            "inputs_sha256": inputs_hash,
            "model_files": hash_folder(final / "model"),
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            **(extra or {}),
        }
        # A fresh id per run: a stage that ran again hands later stages a new key, so they run again too,
        # even when deterministic training reproduced the same bytes.
        done["run_id"] = uuid.uuid4().hex
        done["key"] = sha256_json([config_hash, inputs_hash, done["model_files"], done["run_id"]])
        atomic_write_json(final / "DONE", done)
        return done

    @staticmethod
    def check_done(final: Path, config_hash: str, inputs_hash: str) -> tuple[dict | None, str]:
        """(DONE record, "") when the stage is done and intact, else (None, why it must run)."""
        path = final / "DONE"
        if not path.is_file():
            return None, "not done"
        try:
            done = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None, "DONE marker unreadable"
        if done.get("config_sha256") != config_hash:
            return None, "config changed"
        if done.get("inputs_sha256") != inputs_hash:
            return None, "inputs changed"
        model = final / "model"
        on_disk = hash_folder(model) if model.is_dir() else {}
        for rel, digest in done.get("model_files", {}).items():
            if on_disk.get(rel) != digest:
                state = "is missing" if rel not in on_disk else "no longer matches the sha256 in DONE"
                return None, f"model file {model / rel} {state}"
        added = sorted(set(on_disk) - set(done.get("model_files", {})))
        if added:  # a stray file (a pickle .bin, say) would ship in a folder marked done
            return None, f"model file {model / added[0]} was added after DONE"
        return done, ""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _discarded(work: Path, config_hash: str, inputs_hash: str) -> Path:
    """Where the attempt of one config and inputs is set aside: `.NN_<name>.discarded-<12 hex>`."""
    tag = hashlib.sha256(f"{config_hash}:{inputs_hash}".encode()).hexdigest()[:12]
    return work.with_name(f"{work.name.removesuffix('.tmp')}.discarded-{tag}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
