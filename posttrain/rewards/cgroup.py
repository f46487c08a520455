"""A memory cgroup per sandboxed call, where this process may make one: the sum over the sandbox's processes.

RLIMIT_AS binds one process, so a reward that forks 8 children of 400 MB under ``memory_mb: 512`` used 3.2 GB. A
cgroup bounds them together (and the pages of its tmpfs, which RLIMIT_AS does not see): the kernel's OOM killer
stops a process of the group when the sum passes the limit, and ``oom_kill`` in the group's events says so.

Made under this process's own cgroup, in cgroup v2 when its memory controller is enabled for children there
(``cgroup.subtree_control``: a root container, a delegated systemd unit), else in cgroup v1's memory hierarchy
(with the pids controller's, where mounted). Where neither is writable (a user without delegation), ``create``
returns None and the caller keeps RLIMIT_NPROC low and divides the address space instead (``sandbox.py``).

Written by hand (file writes under /sys/fs/cgroup): systemd's transient units (``systemd-run --scope``) need a
running systemd and D-Bus, which containers lack, and the Python cgroup packages on PyPI (cgroupspy, cgroup-utils)
are v1-only and unmaintained.
"""
from __future__ import annotations

import functools
import itertools
import os
import signal
import time
from pathlib import Path

_PREFIX = "posttrain-sandbox-"
_counter = itertools.count()
_swept: set[Path] = set()  # parents already cleared of stale groups by this process


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of every cgroup mount."""
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                    out.append((parts[1].replace("\\040", " "), parts[2], set(parts[3].split(","))))
    except OSError:
        pass
    return out


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per hierarchy: "" for v2, else each v1 controller's name."""
    paths = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    paths[c] = path
    except (OSError, ValueError):
        pass
    return paths


@functools.lru_cache(maxsize=1)
def _layout() -> tuple[str, Path, Path | None] | None:
    """("v2", parent dir, None) or ("v1", memory parent dir, pids parent dir or None); None: no cgroup here."""
    own = _own_paths()
    for mount, kind, opts in _mounts():
        if kind == "cgroup2" and "" in own:
            base = Path(mount + own[""])
            try:
                if "memory" in (base / "cgroup.subtree_control").read_text().split() and os.access(base, os.W_OK):
                    return "v2", base, None
            except OSError:
                continue
    memory = next((Path(m + own["memory"]) for m, k, o in _mounts() if k == "cgroup" and "memory" in o
                   and "memory" in own), None)
    if memory is None or not os.access(memory, os.W_OK):
        return None
    pids = next((Path(m + own["pids"]) for m, k, o in _mounts() if k == "cgroup" and "pids" in o
                 and "pids" in own), None)
    return "v1", memory, pids if pids is not None and os.access(pids, os.W_OK) else None


class Cgroup:
    """One sandboxed call's cgroup (one folder per hierarchy used)."""

    def __init__(self, version: str, dirs: list[Path]):
        self.version, self.dirs = version, dirs

    @classmethod
    def create(cls, memory_bytes: int, max_procs: int) -> Cgroup | None:
        """A new cgroup limited to ``memory_bytes`` (no swap) and ``max_procs`` tasks, or None where none can be
        made here."""
        layout = _layout()
        if layout is None:
            return None
        version, memory, pids = layout
        name = f"{_PREFIX}{os.getpid()}-{next(_counter)}"
        made: list[Path] = []
        try:
            for parent in [memory] + ([pids] if pids else []):
                _remove_stale(parent)
                (parent / name).mkdir()
                made.append(parent / name)
                os.chmod(parent / name, 0o755)  # whatever the umask: the sandbox may read its own limits
            group = cls(version, made)
            if version == "v2":
                group._write("memory.max", memory_bytes)
                group._write("memory.swap.max", 0, required=False)
                group._write("pids.max", max_procs, required=False)
            else:
                group._write("memory.limit_in_bytes", memory_bytes)
                group._write("memory.memsw.limit_in_bytes", memory_bytes, required=False)
                if pids:
                    group._write("pids.max", max_procs, required=False)
            return group
        except OSError:
            for d in made:
                _rmdir(d)
            return None

    def _write(self, name: str, value: int, required: bool = True) -> None:
        for d in self.dirs:
            if (d / name).exists():
                (d / name).write_text(str(value))
                return
        if required:
            raise OSError(f"no {name} in {self.dirs}")

    def add(self, pid: int) -> bool:
        """Move ``pid`` (the supervisor, before it runs anything) into the group; False if it could not be."""
        try:
            for d in self.dirs:
                (d / "cgroup.procs").write_text(str(pid))
            return True
        except OSError:
            return False

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the group for memory."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            fields = dict(line.split() for line in (self.dirs[0] / name).read_text().splitlines() if " " in line)
        except (OSError, ValueError):
            return False
        return int(fields.get("oom_kill", "0")) > 0

    def remove(self) -> None:
        """Kill whatever is left in the group and remove it."""
        for d in self.dirs:
            _kill_members(d)
            _rmdir(d)


def _kill_members(d: Path) -> None:
    for _ in range(10):  # a member may fork while we kill; the pids limit bounds how often
        try:
            pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _rmdir(d: Path) -> None:
    for _ in range(50):  # an exited task leaves the group a moment after its parent reaped it
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


def _remove_stale(parent: Path) -> None:
    """Remove the cgroups of this prefix whose process is gone (killed before it could remove them); once per
    parent and process."""
    if parent in _swept:
        return
    _swept.add(parent)
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(_PREFIX)]
    except OSError:
        return
    for p in entries:
        owner = p.name[len(_PREFIX):].split("-")[0]
        if owner.isdigit() and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
            _kill_members(p)
            try:
                p.rmdir()
            except OSError:
                pass
