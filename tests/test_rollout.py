"""Rollout backends: config checks, the GRPOConfig mapping and the `vllm serve` command. The vLLM server's
lifecycle (health wait, death, cleanup) is tested with a stand-in server in tests/reliability/test_vllm_server.py.
"""
import os
import sys

import pytest
from pydantic import ValidationError

from posttrain import rollout
from posttrain.config import ConfigError, load_pipeline
from posttrain.rollout import (
    RolloutConfig,
    grpo_rollout_args,
    resolve_backend,
    server_env,
    vllm_serve_command,
)

import posttrain.stages  # noqa: F401  (registers grpo)


@pytest.fixture
def vllm_there(monkeypatch):
    """vllm counts as installed, and no launcher's process counts are set (the tests set their own)."""
    monkeypatch.setattr(rollout, "vllm_installed", lambda: True)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", rollout.PLANNED_PROCESSES_ENV):
        monkeypatch.delenv(name, raising=False)


def _load_grpo(rollout_block: dict):
    return load_pipeline(None, data={"stages": [{"kind": "grpo", "rollout": rollout_block}]})


@pytest.mark.parametrize("backend", ["vllm_server", "vllm_colocate"])
def test_vllm_backend_without_vllm_is_a_config_error(monkeypatch, backend):
    monkeypatch.setattr(rollout, "vllm_installed", lambda: False)
    with pytest.raises(ValidationError, match=r"pip install -e \.\[gpu\]"):
        RolloutConfig(backend=backend)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.rollout.*pip install -e \.\[gpu\]"):
        load_pipeline(None, data={"stages": [{"kind": "grpo", "rollout": {"backend": backend}}]})


def test_server_options_need_the_server_backend():
    with pytest.raises(ValidationError, match="vllm_server only"):
        RolloutConfig(backend="hf", gpus=[1])
    with pytest.raises(ValidationError, match="extra"):
        RolloutConfig(backend="hf", gpu=[1])


def test_backend_mapping_to_grpo_config(monkeypatch, vllm_there):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend(RolloutConfig()) == "hf"
    assert grpo_rollout_args(RolloutConfig(), "hf") == {"use_vllm": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend(RolloutConfig()) == "vllm_colocate"
    monkeypatch.setenv("WORLD_SIZE", "2")  # colocated TP 2 spans two training processes
    colo_cfg = RolloutConfig(backend="vllm_colocate", tensor_parallel_size=2)
    monkeypatch.delenv("WORLD_SIZE")  # GRPOConfig below would start a distributed state
    colo = grpo_rollout_args(colo_cfg, "vllm_colocate")
    assert colo == {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
                    "vllm_tensor_parallel_size": 2}
    cfg = RolloutConfig(backend="vllm_server", url="http://10.0.0.5:8000/", health_timeout_s=30)
    server = grpo_rollout_args(cfg, "vllm_server", cfg.url, group_port=40123)
    assert server == {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://10.0.0.5:8000",
                      "vllm_server_timeout": 30, "vllm_group_port": 40123}  # not TRL's fixed 51216
    from trl import GRPOConfig

    assert GRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[], **server).vllm_group_port == 40123


def test_server_command_is_the_vllm_serve_trl_builds(monkeypatch, vllm_there):
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
    assert "--trust-remote-code" not in vllm_serve_command("/models/x", cfg, 8123)


@pytest.mark.parametrize("block, error", [
    ({}, r"rollout: rollout\.gpus: backend vllm_server starts a vLLM server, which needs GPUs apart from training's"),
    ({"gpus": [1], "tensor_parallel_size": 2}, r"rollout: rollout\.gpus: 1 GPU\(s\) for rollout\.tensor_parallel_size 2"),
    ({"gpus": [0]}, r"rollout: rollout\.gpus: GPU 0 is a training process's"),  # the trainer's own GPU: NCCL refuses
    ({"gpus": [1, 1]}, r"rollout: rollout\.gpus: GPU 1 is listed twice"),
    ({"gpus": [-1]}, r"rollout\.gpus\[0\]: Input should be greater than or equal to 0"),
    ({"url": "http://h:8000", "gpus": [1]}, r"rollout: rollout\.url names a running server, so none is started"),
    ({"group_port": 70000, "gpus": [1]}, r"rollout\.group_port: Input should be less than or equal to 65535"),
])
def test_started_server_needs_gpus_of_its_own(vllm_there, block, error):
    """Refused when the config loads (exit 2 naming the key), not when NCCL or vLLM meets it mid-stage."""
    with pytest.raises(ConfigError, match=r"^<config>: stages\[0\]\." + error):
        _load_grpo({"backend": "vllm_server", **block})


def test_server_gpus_apart_from_every_training_process(vllm_there, monkeypatch):
    assert _load_grpo({"backend": "vllm_server", "gpus": [1]}).stages[0].rollout.gpus == [1]
    assert _load_grpo({"backend": "vllm_server", "url": "http://h:8000"}).stages[0].rollout.url  # nothing started
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes on this machine: GPUs 0 and 1
    with pytest.raises(ConfigError, match=r"GPU 1 is a training process's \(the 2 training process\(es\) on this "
                                          r"machine use GPUs 0-1\)"):
        _load_grpo({"backend": "vllm_server", "gpus": [2, 1], "tensor_parallel_size": 2})
    assert _load_grpo({"backend": "vllm_server", "gpus": [2, 3], "tensor_parallel_size": 2}).stages[0].rollout


@pytest.mark.parametrize("backend", ["vllm_colocate", "auto"])
def test_colocated_tensor_parallel_must_divide_the_training_processes(vllm_there, monkeypatch, backend):
    """TRL's colocate mode refuses a tensor_parallel_size that does not divide its world size, but only once the
    trainer starts; the config refuses it at load, naming both keys."""
    block = {"backend": backend, "tensor_parallel_size": 2}
    with pytest.raises(ConfigError, match=rf"rollout\.tensor_parallel_size 2 with rollout\.backend {backend}: .*"
                                          r"this run has 1; launch a multiple of 2"):
        _load_grpo(block)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="this run has 3"):
        _load_grpo(block)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _load_grpo(block).stages[0].rollout.tensor_parallel_size == 2


def test_config_read_before_an_accelerate_launch_counts_the_planned_processes(vllm_there, tmp_path):
    """`posttrain stage grpo --launcher accelerate` reads the config in one process before it relaunches itself
    (WORLD_SIZE unset): the count is --num-processes, else the accelerate config's num_processes."""
    from posttrain.distributed import planned_launch

    block = {"backend": "vllm_colocate", "tensor_parallel_size": 2}
    with planned_launch("accelerate", 2, None):
        assert _load_grpo(block).stages[0].rollout.tensor_parallel_size == 2
    config = tmp_path / "acc.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    with planned_launch("accelerate", None, str(config)):
        assert _load_grpo(block).stages[0].rollout.tensor_parallel_size == 2
        with pytest.raises(ConfigError, match="GPU 3 is a training process's"):
            _load_grpo({"backend": "vllm_server", "gpus": [3]})
    with planned_launch("accelerate", 3, None), pytest.raises(ConfigError, match="this run has 3"):
        _load_grpo(block)
    with planned_launch("none", 2, None), pytest.raises(ConfigError, match="this run has 1"):
        _load_grpo(block)
    assert rollout.PLANNED_PROCESSES_ENV not in os.environ  # put back after each


def test_server_gpus_index_the_devices_this_process_sees(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert server_env([3, 1]) == {"VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": "7,5"}
    with pytest.raises(ConfigError, match=r"rollout\.gpus: GPU 4 is past the 4 GPU\(s\) this process sees "
                                          r"\(CUDA_VISIBLE_DEVICES=4,5,6,7\)"):
        server_env([4])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa, GPU-bb")  # UUIDs pass through as they are
    assert server_env([1])["CUDA_VISIBLE_DEVICES"] == "GPU-bb"
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert server_env([1])["CUDA_VISIBLE_DEVICES"] == "1"
    with pytest.raises(ConfigError, match=r"GPU 2 is past the 2 GPU\(s\) this process sees \(no CUDA_VISIBLE"):
        server_env([2])
