"""Rollout backends: config checks, the GRPOConfig mapping and the `vllm serve` command. The vLLM server's
lifecycle (health wait, death, cleanup) is tested with a stand-in server in tests/reliability/test_vllm_server.py.
"""
import sys

import pytest
from pydantic import ValidationError

from posttrain import rollout
from posttrain.stages import grpo
from posttrain.rollout import (
    RolloutConfig,
    grpo_rollout_args,
    resolve_backend,
    vllm_serve_command,
)


@pytest.mark.parametrize("backend", ["vllm_server", "vllm_colocate"])
def test_vllm_backend_without_vllm_is_a_config_error(monkeypatch, backend):
    monkeypatch.setattr(rollout, "vllm_installed", lambda: False)
    with pytest.raises(ValidationError, match=r"pip install -e \.\[gpu\]"):
        RolloutConfig(backend=backend)
    from posttrain.config import ConfigError, load_pipeline

    import posttrain.stages  # noqa: F401
    with pytest.raises(ConfigError, match=r"stages\[0\]\.rollout.*pip install -e \.\[gpu\]"):
        load_pipeline(None, data={"stages": [{"kind": "grpo", "rollout": {"backend": backend}}]})


def test_server_options_need_the_server_backend():
    with pytest.raises(ValidationError, match="vllm_server only"):
        RolloutConfig(backend="hf", gpus=[1])
    with pytest.raises(ValidationError, match="extra"):
        RolloutConfig(backend="hf", gpu=[1])


def test_backend_mapping_to_grpo_config(monkeypatch):
    import torch

    monkeypatch.setattr(rollout, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend(RolloutConfig()) == "hf"
    assert grpo_rollout_args(RolloutConfig(), "hf") == {"use_vllm": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend(RolloutConfig()) == "vllm_colocate"
    colo = grpo_rollout_args(RolloutConfig(backend="vllm_colocate", tensor_parallel_size=2), "vllm_colocate")
    assert colo == {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
                    "vllm_tensor_parallel_size": 2}
    cfg = RolloutConfig(backend="vllm_server", url="http://10.0.0.5:8000/", health_timeout_s=30)
    assert grpo_rollout_args(cfg, "vllm_server", cfg.url) == {
        "use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://10.0.0.5:8000",
        "vllm_server_timeout": 30}
    from trl import GRPOConfig

    GRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[], **grpo_rollout_args(cfg, "vllm_server", cfg.url))


def test_server_command_is_the_vllm_serve_trl_builds(monkeypatch):
    monkeypatch.setattr(rollout, "vllm_installed", lambda: True)
    cfg = RolloutConfig(backend="vllm_server", gpus=[1, 2], tensor_parallel_size=2, server_args=["--max-num-seqs", "64"])
    cmd = vllm_serve_command("/models/x", cfg, 8123, trust_remote_code=True)
    assert cmd[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "/models/x"]
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert {k: flags[k] for k in ("--host", "--port", "--tensor-parallel-size", "--gpu-memory-utilization")} == {
        "--host": "127.0.0.1", "--port": "8123", "--tensor-parallel-size": "2",
        "--gpu-memory-utilization": "0.9"}  # a server on GPUs of its own takes most of their memory
    # What TRL's client needs from the server: NCCL weight transfer and processed logprobs, then ours as-is.
    assert cmd[cmd.index("--weight-transfer-config") + 1] == '{"backend": "nccl"}'
    assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert "--trust-remote-code" in cmd and cmd[-2:] == ["--max-num-seqs", "64"]
    assert grpo._server_env([1, 2]) == {"VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": "1,2"}
    assert "--trust-remote-code" not in vllm_serve_command("/models/x", cfg, 8123)
