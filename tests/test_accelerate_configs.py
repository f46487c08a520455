"""configs/accelerate/: each file is one `accelerate launch --config_file` accepts, and says what its name says.

Checked with accelerate's own code, in process, without GPUs or launching anything: its config loader
(unknown keys are errors there), its launch-argument resolution (which launcher and how many processes), and,
for FSDP, the plugin built from the environment the launcher would set. `_validate_launch_command` is private
to accelerate; if an upgrade moves it, these tests say so rather than a multi-GPU run.
"""
from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parent.parent
ACCEL = REPO / "configs" / "accelerate"
FILES = sorted(ACCEL.glob("*.yaml"))

# file -> (distributed_type, num_processes, mixed_precision)
EXPECTED = {
    "ddp.yaml": ("MULTI_GPU", 8, "bf16"),
    "ddp_cpu.yaml": ("MULTI_CPU", 2, "no"),
    "fsdp.yaml": ("FSDP", 8, "bf16"),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, "bf16"),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, "bf16"),
}


def _cluster(name: str):
    from accelerate.commands.config.config_args import ClusterConfig

    return ClusterConfig.from_yaml_file(str(ACCEL / name))


def _launch_args(name: str, *flags: str):
    """`accelerate launch --config_file <name> [flags] train.py`, resolved the way `accelerate launch` does."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(ACCEL / name), *flags, "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_every_expected_file_is_there():
    assert {p.name for p in FILES} == set(EXPECTED)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_loads_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import ComputeEnvironment, DistributedType

    cfg = load_config_from_file(str(path))  # picks ClusterConfig; raises on unknown keys
    dist, procs, precision = EXPECTED[path.name]
    assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert cfg.distributed_type == DistributedType(dist)
    assert (cfg.num_processes, cfg.num_machines, cfg.mixed_precision) == (procs, 1, precision)


@pytest.mark.parametrize("name,launcher", [
    ("ddp.yaml", "multi_gpu"), ("fsdp.yaml", "use_fsdp"),
    ("deepspeed_zero2.yaml", "use_deepspeed"), ("deepspeed_zero3.yaml", "use_deepspeed"),
])
def test_launch_picks_the_distributed_launcher(name, launcher):
    args, _ = _launch_args(name)
    flags = {f: bool(getattr(args, f)) for f in ("multi_gpu", "use_fsdp", "use_deepspeed")}
    assert flags == {f: f == launcher for f in flags}
    assert args.num_processes == 8 and args.mixed_precision == "bf16" and not args.cpu


def test_ddp_cpu_launches_two_cpu_processes_with_multi_gpu_flag():
    """MULTI_CPU alone takes accelerate's single-process launcher; --multi_gpu takes torchrun, still on CPU."""
    alone, _ = _launch_args("ddp_cpu.yaml")
    assert not alone.multi_gpu  # -> simple_launcher: one process (the reason ddp_cpu.yaml documents --multi_gpu)
    args, _ = _launch_args("ddp_cpu.yaml", "--multi_gpu")
    assert args.multi_gpu and not args.cpu  # -> multi_gpu_launcher (torchrun)
    assert args.num_processes == 2 and args.use_cpu and args.mixed_precision == "no"


def test_fsdp_is_fsdp2_full_shard_transformer_wrap():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType

    fsdp = _cluster("fsdp.yaml").fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_sharding_strategy" not in fsdp  # FSDP1's spelling; deprecated under FSDP2
    args, _ = _launch_args("fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()  # what the training processes build from that environment
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.auto_wrap_policy is not None and plugin.transformer_cls_names_to_wrap is None  # _no_split_modules


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_zero_stage(name, stage):
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    ds = _cluster(name).deepspeed_config
    assert ds["zero_stage"] == stage
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
    assert ds["zero3_init_flag"] is (stage == 3)
    assert ds.get("zero3_save_16bit_model", False) is (stage == 3)  # whole 16-bit weights on save
    # Left to the Trainer ("auto"), so the recipe's trainer config stays the one source of these values.
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    args, defaults = _launch_args(name)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)  # builds the environment only; needs no deepspeed install
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
