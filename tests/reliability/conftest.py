"""What the reliability tests share: one tiny `posttrain stage sft` command, runs of it with a fault injected
(tests/reliability/faults.py), and the weights of an uninterrupted run to compare resumed runs against."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

# 32 rows / batch 4 = 8 optimizer steps an epoch; 12 steps with a checkpoint every 4 (4, 8, 12).
SFT = ["stage", "sft", "--set", "eval.enabled=false", "--set", "data=[{source: arithmetic, limit: 32}]",
       "--set", "trainer.per_device_train_batch_size=4", "--set", "trainer.save_steps=4",
       "--set", "trainer.logging_steps=1", "--set", "trainer.max_steps=12",
       "--set", "trainer.warmup_steps=0", "--set", "trainer.learning_rate=1e-4"]


def sft_args(run_dir: Path, accum: int = 1) -> list[str]:
    return [*SFT, "--set", f"trainer.gradient_accumulation_steps={accum}", "--run-dir", str(run_dir)]


def run_with_fault(fault: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`posttrain <args>` with one fault of tests/reliability/faults.py installed."""
    return subprocess.run([sys.executable, "-m", "tests.reliability.faults", fault, *args], cwd=REPO,
                          env=dict(os.environ), capture_output=True, text=True, timeout=timeout)


def weights_sha(run_dir: Path, folder: str = "01_sft") -> str:
    return hashlib.sha256((run_dir / "stages" / folder / "model" / "model.safetensors").read_bytes()).hexdigest()


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines of the CLI's stderr (tqdm may leave a partial line before one)."""
    return [line[line.index("error:"):] for line in stderr.splitlines() if "error:" in line]


def cli_here(capsys, *args: str) -> tuple[int, str]:
    """`posttrain <args>` in this process (for faults installed with monkeypatch): (exit code, stderr)."""
    from posttrain.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture(scope="session")
def uninterrupted(world, tmp_path_factory) -> dict[int, Path]:
    """Run dirs of the SFT command run without a fault, by gradient accumulation steps (read, never write)."""
    out = {}
    for accum in (1, 2):
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        r = run_cli(*sft_args(run_dir, accum))
        assert r.returncode == 0, r.stderr[-2000:]
        out[accum] = run_dir
    return out
