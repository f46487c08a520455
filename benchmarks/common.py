"""What every benchmark figure shares: the record it returns, side-by-side timing, medians, the machine.

A figure is a ratio (posttrain over the raw library, measured in the same run, alternating A and B so a
busy machine slows both alike) or an absolute number with a goal. Figures that cannot be measured here say
so (`skipped`, `unavailable`) with the reason; figures off their goal keep their number and say `OFF GOAL`.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"  # git-ignored: the bench-only mergekit install lives here


@dataclass
class Figure:
    """One row of the table. `value` is None when the figure is skipped or unavailable (`note` says why)."""

    name: str
    value: float | None
    goal: float | None
    unit: str = "ratio"  # ratio (posttrain / raw, lower is better), s, MB
    runs: list[float] = field(default_factory=list)
    note: str = ""
    status: str = ""  # filled by finish(): ok | OFF GOAL | skipped | unavailable | info
    group: str = ""  # the benchmarks.run group that measured it (a run with --only replaces its group's rows)
    detail: dict[str, Any] = field(default_factory=dict)

    def finish(self) -> "Figure":
        if not self.status:
            if self.value is None:
                self.status = "unavailable"
            elif self.goal is None:
                self.status = "info"
            else:
                self.status = "ok" if self.value <= self.goal else "OFF GOAL"
        return self

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = None if self.value is None else round(self.value, 3)
        d["runs"] = [round(r, 3) for r in self.runs]
        d["met"] = self.status == "ok"
        return d


def skipped(name: str, why: str, goal: float | None = None, unit: str = "ratio") -> Figure:
    return Figure(name, None, goal, unit, note=why, status="skipped")


def unavailable(name: str, why: str, goal: float | None = None, unit: str = "ratio") -> Figure:
    return Figure(name, None, goal, unit, note=why, status="unavailable")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(a: Callable[[], float], b: Callable[[], float], runs: int) -> tuple[list[float], list[float]]:
    """Run a and b alternately `runs` times each (a, b, b, a, a, b, ...: neither side always goes first)."""
    xs, ys = [], []
    for i in range(runs):
        if i % 2 == 0:
            xs.append(a())
            ys.append(b())
        else:
            ys.append(b())
            xs.append(a())
    return xs, ys


def ratio_figure(name: str, ours: list[float], raw: list[float], goal: float | None, note: str = "",
                 detail: dict[str, Any] | None = None) -> Figure:
    """Median of the per-pair ratios ours[i] / raw[i] (pairs ran back to back, so they share the noise)."""
    ratios = [o / r for o, r in zip(ours, raw)]
    extra = {"ours_median": round(median(ours), 4), "raw_median": round(median(raw), 4)}
    return Figure(name, median(ratios), goal, "ratio", ratios, note, detail={**extra, **(detail or {})})


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
          timeout: float = 900) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of a subprocess (startup included); raises with its stderr tail when it fails."""
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=timeout)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {r.returncode}: {r.stderr[-1500:]}")
    return seconds, r


# Linux carries a process's peak RSS across exec, and subprocess forks with vfork, so a command started
# straight from the bench (which holds torch, TRL and the world) would report the bench's own peak if larger.
# The command is started from this small launcher instead; it reports the command's wall seconds and peak RSS
# (ru_maxrss, KB) on its last stdout line, after everything the command printed.
_LAUNCH = ("import json, os, subprocess, sys, time\n"
           "start = time.perf_counter()\n"
           "proc = subprocess.Popen(sys.argv[1:])\n"
           "_, status, usage = os.wait4(proc.pid, 0)\n"
           "seconds = time.perf_counter() - start\n"
           "sys.stdout.flush()\n"
           "print(json.dumps([os.waitstatus_to_exitcode(status), seconds, usage.ru_maxrss / 1024]))\n")


def measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 900) -> tuple[float, str, float]:
    """(wall seconds, stdout, peak RSS in MB) of a subprocess; raises with its stderr tail when it fails."""
    r = subprocess.run([sys.executable, "-c", _LAUNCH, *cmd], capture_output=True, text=True, env=env,
                       cwd=cwd or REPO, timeout=timeout)
    lines = r.stdout.rstrip("\n").split("\n")
    rc, seconds, rss_mb = json.loads(lines[-1]) if r.returncode == 0 else (r.returncode, 0.0, 0.0)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {rc}: {r.stderr[-1500:]}")
    return seconds, "\n".join(lines[:-1]), rss_mb


def bench_env(**extra: str) -> dict[str, str]:
    """The environment every side runs under: the same thread count, no tokenizer threads, no hub access.

    One compute thread per side unless BENCH_THREADS says otherwise: on a shared machine, OpenMP threads that
    outnumber the free cores spin against each other and made single runs 10-50x slower at random (seen on
    2 cores with other jobs running), which no median of 3 survives.
    """
    env = dict(os.environ)
    threads = os.environ.get("BENCH_THREADS", "1")
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
               OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               POSTTRAIN_EVAL_CACHE="off")  # time the eval, not a read of the cross-run eval cache
    env.update(extra)
    return env


def python() -> str:
    return sys.executable


def machine() -> dict[str, Any]:
    """What the table ran on, and how busy the machine was when it started (these machines are shared)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        gpu, torch_version = None, None
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1), "gpu": gpu,
            "os": platform.platform(), "python": platform.python_version(), "torch": torch_version,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
