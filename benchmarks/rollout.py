"""GPU figure: rollout tokens per second, vLLM over transformers' `generate`, same model and prompts. Skipped
without CUDA, unavailable without vllm (pip install -e .[gpu]). Each side runs in its own process
(benchmarks/rollout_worker.py) so that vLLM's memory pool does not meet the transformers model."""
from __future__ import annotations

import importlib.util
import json

from benchmarks.common import Figure, bench_env, paired, python, ratio_figure, skipped, timed, unavailable

NAME = "rollout: vLLM tokens/s over transformers generate"


def figure(runs: int) -> Figure:
    import torch

    if not torch.cuda.is_available():
        return skipped(NAME, "no CUDA device on this machine", unit="ratio")
    if importlib.util.find_spec("vllm") is None:
        return unavailable(NAME, "vllm is not installed (pip install -e .[gpu])")
    env = bench_env()

    def side(backend: str):
        def go() -> float:
            _, r = timed([python(), "-m", "benchmarks.rollout_worker", backend], env)
            return json.loads(r.stdout.strip().splitlines()[-1])["tokens_per_second"]
        return go

    vllm, hf = paired(side("vllm"), side("hf"), runs)
    # A speed-up, not an overhead: higher is better, so the figure has no upper goal.
    return ratio_figure(NAME, vllm, hf, None, "world-sft, 256 prompts, 64 new tokens, greedy")
