"""Shared fixtures: the embedded world (built once per cache), tiny local models, CLI runner.

Tests never touch the network: the world is generated locally, other architectures are built from configs.
`POSTTRAIN_CACHE` is honoured so CI and developers share one built world across runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tests train ~1M-parameter models, where torch's intra-op threads cost more than they gain, and pytest runs
# CLI subprocesses beside itself: two 2-thread torch processes on 2 cores ran 20x slower than 1-thread ones.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def world():
    """Path of the built world (data/, base/); built on first use, cached afterwards."""
    from posttrain.world import world_dir

    return world_dir()


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900):
    """Run `python -m posttrain ...` in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "posttrain", *args],
        cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli
