"""mergekit's command line (`mergekit-yaml`) for the merge figures, installed for the benchmark only.

mergekit is never a dependency of posttrain and never imported by it. It is pip-installed with --no-deps into
benchmarks/_work/mergekit-<version>/ (git-ignored), together with the three small packages it needs that
posttrain's environment lacks; everything else (torch, transformers, safetensors, pydantic, ...) is the
environment's own, so pip can never pull a different torch. It runs as
`python -c <mergekit-yaml main> config.yml out` with that folder on PYTHONPATH.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from benchmarks.common import WORK, bench_env, python

VERSION = "0.1.5"
TARGET = WORK / f"mergekit-{VERSION}"
# Requirements of mergekit 0.1.5 absent from posttrain's environment (the rest are already installed).
MISSING = ["immutables", "sentencepiece", "protobuf"]
MAIN = "import sys; sys.argv[0] = 'mergekit-yaml'; from mergekit.scripts.run_yaml import main; main()"


def install() -> str | None:
    """Install once; returns None when usable, else the reason it is not (the figure says 'unavailable')."""
    if not (TARGET / "mergekit").is_dir():
        cmd = [python(), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target",
               str(TARGET), f"mergekit=={VERSION}", *MISSING]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return f"pip install mergekit=={VERSION} failed: {r.stderr.strip().splitlines()[-1:]}"
    check = subprocess.run([python(), "-c", "import torch, mergekit.merge; print(torch.__version__)"],
                           capture_output=True, text=True, env=env(), timeout=300)
    if check.returncode != 0:
        return f"mergekit {VERSION} does not import here: {check.stderr.strip().splitlines()[-1:]}"
    return None


def env() -> dict[str, str]:
    e = bench_env()
    e["PYTHONPATH"] = str(TARGET) + (":" + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


# posttrain method -> mergekit's name and per-model parameters (posttrain's defaults: the same densities, DELLA's
# epsilon). model_stock takes no per-model parameters in mergekit (not even a weight).
METHODS = {
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {"density": 0.2}),
    "dare_ties": ("dare_ties", {"density": 0.1}),
    "dare_linear": ("dare_linear", {"density": 0.1}),
    "model_stock": ("model_stock", None),
    "della": ("della", {"density": 0.5, "epsilon": 0.15}),
}


def command(method: str, inputs: list[Path], out: Path, shard_bytes: int, workdir: Path,
            out_dtype: str = "float32") -> list[str]:
    """The mergekit-yaml command merging inputs[1:] onto inputs[0], math in float32 and output in `out_dtype`
    (posttrain's merge stage does the same), in shards of `shard_bytes` (mergekit counts them in elements)."""
    name, params = METHODS[method]
    cfg = {"merge_method": name, "base_model": str(inputs[0]), "dtype": "float32",
           "models": [{"model": str(m)} if params is None else
                      {"model": str(m), "parameters": {"weight": 1.0, **params}} for m in inputs[1:]]}
    if out_dtype != "float32":
        cfg["out_dtype"] = out_dtype
    if name in ("ties", "dare_ties", "dare_linear"):
        cfg["parameters"] = {"normalize": False}  # no division by the summed weights (all 1 here)
    path = workdir / f"mergekit-{method}.yml"
    path.write_text(yaml.safe_dump(cfg))
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[out_dtype]
    return [python(), "-c", MAIN, str(path), str(out), "--out-shard-size", str(shard_bytes // itemsize),
            "--no-copy-tokenizer", "--quiet", "--random-seed", "0"]
