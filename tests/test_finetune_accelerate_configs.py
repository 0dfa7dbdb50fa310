"""Every shipped `accelerate launch` config goes through accelerate's own loader and launch-time
checks, and its FSDP / DeepSpeed settings build accelerate's plugins.

The CPU configs train in tests: ddp_cpu_gloo.yaml in tests/test_finetune_ddp.py, fsdp_cpu_gloo.yaml
(FSDP2; accelerate 1.15 shards only on accelerators, qingzhou's loop switches its gloo group to FSDP
itself) in tests/test_finetune_fsdp.py. The GPU configs are checked here as far as accelerate's
loader and plugins go.
"""
from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

CONFIG_DIR = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def _launch_env(path: Path) -> tuple[dict[str, str], object]:
    """What `accelerate launch --config_file path train.py` validates and exports to each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        # launch_command sets this before calling the DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return env, args


def test_every_config_is_covered():
    assert {p.name for p in CONFIGS} >= {"ddp_cpu_gloo.yaml", "ddp_2gpu.yaml", "multinode_ddp.yaml", "fsdp.yaml",
                                          "fsdp_cpu_gloo.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3_offload.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_loads_and_validates(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # unknown keys are a TypeError here
    env, args = _launch_env(path)
    assert args.num_processes == config.num_processes >= 2
    assert args.num_machines == config.num_machines
    assert env["ACCELERATE_MIXED_PRECISION"] == str(config.mixed_precision)
    if config.num_machines > 1:
        assert args.machine_rank == 0 and args.main_process_ip


def test_fsdp_config_builds_an_fsdp2_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    env, args = _launch_env(CONFIG_DIR / "fsdp.yaml")
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")


@pytest.mark.parametrize("name,stage,offload", [("deepspeed_zero2.yaml", 2, "none"), ("deepspeed_zero3_offload.yaml", 3, "cpu")])
def test_deepspeed_configs_build_a_zero_plugin(name, stage, offload):
    from accelerate.utils import DeepSpeedPlugin

    env, args = _launch_env(CONFIG_DIR / name)
    assert args.use_deepspeed and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == stage == zero["stage"]
    assert zero["offload_optimizer"]["device"] == offload
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0
