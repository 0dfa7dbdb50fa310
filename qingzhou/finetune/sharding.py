"""What the training loop needs to know about a multi-process launch: FSDP (also on CPU/gloo),
the checks that refuse a launch or model that cannot work before any step runs, and the
per-process (sharded) view of parameters and optimizer state that checkpoints save.

Why FSDP needs help on CPU: accelerate 1.15 turns an FSDP launch into FSDP only for accelerator
process groups (MULTI_GPU/NPU/XPU...); on a CPU-only machine it silently trains plain gloo data
parallel. torch's FSDP2 `fully_shard` runs on CPU with gloo, so `enable_fsdp_on_cpu` promotes the
accelerator's state to FSDP with the plugin built from the launch config, and from then on every
FSDP code path of accelerate (prepare, clip_grad_norm_, get_state_dict) is the one a GPU run takes.
"""
from __future__ import annotations

import os
from typing import Any

from qingzhou.errors import RecipeError

# bitsandbytes optimizers keep their state in their own quantised layout, per whole parameter;
# they do not take sharded (DTensor) parameters.
UNSHARDABLE_OPTIMIZERS = {"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "paged_lion_8bit"}
LAUNCH_HINT = ("Start every node with the same config and `--num_machines N --machine_rank <0..N-1>` "
               "(see README, 'Training on several processes and machines').")


def fsdp_plugin() -> Any:
    """The FSDP settings of an `accelerate launch` with an FSDP config (accelerate exports them as
    ACCELERATE_USE_FSDP / FSDP_* variables, and builds its own plugin from the same ones), or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()


def check_launch(env: dict[str, str] | None = None, accelerator_devices: int | None = None) -> None:
    """Refuse a multi-node launch whose node count or processes per node do not add up, before
    the process group is joined: torchrun exports the world size, this node's process count and
    the number of nodes (`GROUP_WORLD_SIZE`); nodes started with different counts make a world
    that is not nodes x processes-per-node, and more processes per node than accelerators map two
    processes to one device. `accelerator_devices`: how many GPUs this node has (None: CPU run)."""
    env = dict(os.environ) if env is None else env
    if "WORLD_SIZE" not in env or "LOCAL_WORLD_SIZE" not in env:
        return
    world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
    nodes = int(env.get("GROUP_WORLD_SIZE", "1"))
    if world != nodes * local:
        raise RecipeError(
            f"the launch does not add up: {nodes} node(s) (num_machines) x {local} process(es) on this node is "
            f"{nodes * local}, but the job has {world} processes in all, so the nodes were started with different "
            f"process counts (or num_processes is not a multiple of num_machines).",
            where=f"accelerate launch (node {env.get('GROUP_RANK', '?')}, WORLD_SIZE={world}, "
                  f"LOCAL_WORLD_SIZE={local}, GROUP_WORLD_SIZE={nodes})",
            hint="Give every node the same config: num_processes = num_machines x processes per node. " + LAUNCH_HINT)
    if accelerator_devices is not None and accelerator_devices > 0 and local > accelerator_devices:
        raise RecipeError(
            f"{local} processes were started on this node but it has {accelerator_devices} accelerator(s).",
            where=f"accelerate launch (node {env.get('GROUP_RANK', '?')}, LOCAL_WORLD_SIZE={local})",
            hint="Set num_processes to num_machines x the GPUs per node. " + LAUNCH_HINT)


def enable_fsdp_on_cpu(accelerator: Any, plugin: Any) -> None:
    """Make a CPU/gloo accelerator (MULTI_CPU) shard with FSDP `plugin`, as the launch config asked."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def count_deepspeed_cpu_processes(accelerator: Any) -> None:
    """Under a DeepSpeed launch on CPU (DS_ACCELERATOR=cpu, gloo) accelerate 1.15 joins the
    process group but counts one process; take the count and ranks from the group itself, so the
    batch settings and the loss normalisation see the real world."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    if not dist.is_initialized() or accelerator.num_processes == dist.get_world_size():
        return
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):  # the second copies the first
        shared["num_processes"], shared["process_index"] = dist.get_world_size(), dist.get_rank()
        shared["local_process_index"] = int(os.environ.get("LOCAL_RANK", "0"))


def check_fsdp_model(model: Any, cfg: Any, plugin: Any) -> None:
    """Refuse, before training, what FSDP cannot shard: 4-bit bitsandbytes weights (QLoRA), the
    bitsandbytes optimizers, FSDP version 1 (the loop and its checkpoints speak FSDP2), and a
    transformer-layer auto-wrap that finds no layer class in the model."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    where = "accelerate config (distributed_type: FSDP)"
    if plugin.fsdp_version != 2:
        raise RecipeError("FSDP version 1 is not supported by the training loop.", where=f"{where}, fsdp_version",
                          hint="Set fsdp_version: 2 (as in examples/accelerate/fsdp.yaml).")
    if cfg.method == "qlora" or any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        raise RecipeError(
            "QLoRA cannot be trained under FSDP: its 4-bit bitsandbytes base weights are packed uint8 blocks "
            "with per-block scales that FSDP cannot split across processes.", where=f"{where}, method: {cfg.method}",
            hint="Use LoRA (method: lora) under FSDP, or QLoRA with the DDP config (each process holds the 4-bit base).")
    if cfg.optimizer in UNSHARDABLE_OPTIMIZERS:
        raise RecipeError(f"the bitsandbytes optimizer '{cfg.optimizer}' does not take FSDP's sharded parameters.",
                          where=f"{where}, optimizer: {cfg.optimizer}", hint="Use optimizer: adamw under FSDP.")
    policy = plugin.auto_wrap_policy
    policy = getattr(policy, "func", policy)
    if policy is transformer_auto_wrap_policy:
        names = list(plugin.transformer_cls_names_to_wrap or getattr(model, "_no_split_modules", None) or [])
        present = {type(m).__name__ for m in model.modules()}
        missing = [n for n in names if n not in present]
        if not names or missing:
            found = sorted(n for n in present if "layer" in n.lower() or "block" in n.lower())
            raise RecipeError(
                ("the transformer-layer auto-wrap found no layer class in the model: it declares no _no_split_modules "
                 "and the config names none" if not names else
                 f"the transformer-layer auto-wrap names {missing}, which the model ({type(model).__name__}) does not "
                 "contain"),
                where=f"{where}, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, fsdp_transformer_layer_cls_to_wrap",
                hint=f"Set fsdp_transformer_layer_cls_to_wrap to the model's decoder layer class"
                     f"{' (candidates: ' + ', '.join(found) + ')' if found else ''}, or use "
                     "fsdp_auto_wrap_policy: SIZE_BASED_WRAP.")


def leave_process_group() -> None:
    """End a launched run's process group in step with the others (a barrier, then destroy), as
    torch asks of every process before it exits: left to interpreter shutdown, a node whose peers
    have already closed their connections can abort (SIGABRT) instead of exiting 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_sharded(model: Any) -> bool:
    """True when FSDP2 manages (part of) the model; its parameters are then DTensor shards, except
    between a forward and the next backward under shard-grad-op (see `reshard`)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard(model: Any) -> None:
    """Put every FSDP2 module's parameters back into their sharded form. Under shard-grad-op
    (`reshard_after_forward: false`) an evaluation forward leaves them gathered until the next
    backward; checkpoints and the final gather must see the shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_view(t: Any) -> Any:
    """This process's shard of a DTensor (a plain tensor passes through)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(value: Any, param: Any) -> Any:
    """`value` (this process's shard, as a checkpoint holds it) as a DTensor laid out like `param`,
    when `param` is a DTensor and `value` has its local shape; anything else passes through."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor) and hasattr(value, "shape") and tuple(value.shape) == tuple(param.to_local().shape) \
            and value.dim() > 0:
        return DTensor.from_local(value.to(param.to_local().device), param.device_mesh, param.placements,
                                  run_check=False, shape=param.shape, stride=param.stride())
    return value


__all__ = ["fsdp_plugin", "check_launch", "enable_fsdp_on_cpu", "count_deepspeed_cpu_processes", "check_fsdp_model", "is_sharded", "reshard", "local_view",
           "shard_like"]
