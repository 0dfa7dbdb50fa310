"""Resumable checkpoints: trainable weights, optimizer state, RNG state and loop counters.

Everything is safetensors + JSON (no pickle, so a checkpoint from elsewhere cannot run code), and
each checkpoint folder appears atomically, so "the latest folder" is always a complete one.

Under FSDP no process holds the whole model or optimizer: every process writes its own shard
(`<name>.rank<r>-of-<n>.safetensors`, the local pieces of its DTensors) into the folder the main
process opened, and the main process renames the folder into place only after all have written
(a barrier), so a sharded checkpoint is as atomic as a single-file one. It resumes on the same
number of processes (the shards are this world's split; `state.json` records it). torch's
distributed checkpoint format would reshard, but reads its metadata with pickle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qingzhou.finetune.sharding import is_sharded, local_view, reshard, shard_like
from qingzhou.io import atomic_dir, atomic_write_json, discard_dir
from qingzhou.llm.devices import rng_states, set_rng_states

PREFIX = "step-"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path | None = None, *, root: str | Path | None = None) -> Path | None:
    """The newest complete checkpoint under `root` (default `<output_dir>/checkpoints`), or None."""
    root = Path(root) if root is not None else checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file())
    return done[-1] if done else None


def trainable_state(model: Any) -> dict[str, Any]:
    """Trainable parameters on the CPU; under FSDP, this process's shard of each."""
    return {n: local_view(p.detach()).to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def shard_name(stem: str, shards: tuple[int, int] | None) -> str:
    """`trainable.safetensors`, or `trainable.rank00001-of-00002.safetensors` for process 1 of 2."""
    return f"{stem}.safetensors" if shards is None else f"{stem}.rank{shards[0]:05d}-of-{shards[1]:05d}.safetensors"


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-parameter optimizer state as `{"<idx>.<key>[.<subkey>...]": tensor}` + JSON scalars.

    Nested dicts are walked (bitsandbytes' 8-bit optimizers keep their uint8 moments and block
    scales under `__bnb_optimizer_quant_state__`), so no tensor ever reaches the JSON side. A
    tensor shared between parameters (bitsandbytes' quantile maps) is copied, as safetensors
    refuses shared storage."""
    import torch

    tensors, scalars = {}, {}
    seen: set[int] = set()

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = local_view(value.detach()).to("cpu").contiguous()
            tensors[prefix] = t.clone() if t.numel() and t.data_ptr() in seen else t
            seen.add(t.data_ptr())
        elif isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}", sub)
        else:
            scalars[prefix] = value

    for idx, entry in state_dict["state"].items():
        walk(str(idx), entry)
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, *path = flat.split(".")
        node = state.setdefault(int(idx), {})
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(output_dir: str | Path | None, step: int, model: Any, optimizer: Any, loop_state: dict[str, Any],
                    keep: int = 2, *, root: str | Path | None = None, accelerator: Any = None) -> Path | None:
    """Write checkpoint `step` atomically under `root` (default `<output_dir>/checkpoints`) and
    prune all but the newest `keep`.

    Without `accelerator` (or with one whose model is not sharded) the caller is the one process
    that saves. With a sharded model every process must call this: each writes its shard, the
    main process commits the folder; it returns the path on the main process, None elsewhere."""
    root = Path(root) if root is not None else checkpoint_root(output_dir)
    path = root / f"{PREFIX}{step:07d}"
    if accelerator is None or not is_sharded(model):
        with atomic_dir(path, overwrite=True, what="checkpoint") as tmp:
            _write_part(tmp, model, optimizer, None)
            atomic_write_json(tmp / "state.json", {**loop_state, "step": step})
        _prune(root, keep)
        return path
    shards = (accelerator.process_index, accelerator.num_processes)
    reshard(model)
    if not accelerator.is_main_process:
        _write_part(_shared_folder(accelerator, None), model, optimizer, shards)
        accelerator.wait_for_everyone()  # the main process commits after this
        accelerator.wait_for_everyone()  # ... and before anyone goes on
        return None
    with atomic_dir(path, overwrite=True, what="checkpoint") as tmp:
        _write_part(_shared_folder(accelerator, tmp), model, optimizer, shards)
        accelerator.wait_for_everyone()  # every shard is on disk
        atomic_write_json(tmp / "state.json", {**loop_state, "step": step, "shards": shards[1]})
    _prune(root, keep)
    accelerator.wait_for_everyone()
    return path


def _shared_folder(accelerator: Any, tmp: Path | None) -> Path:
    """The main process's temp folder, told to every process (the folder must be on a file system
    all nodes share, as for any sharded checkpoint)."""
    import torch.distributed as dist

    box = [str(tmp) if tmp is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _write_part(folder: Path, model: Any, optimizer: Any, shards: tuple[int, int] | None) -> None:
    """Weights, optimizer state and RNG of this process (all of them when `shards` is None)."""
    from safetensors.torch import save_file

    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(trainable_state(model), str(folder / shard_name("trainable", shards)))
    save_file(opt_tensors, str(folder / shard_name("optimizer", shards)))
    save_file(rng_states(), str(folder / shard_name("rng", shards)))
    if shards is None or shards[0] == 0:
        atomic_write_json(folder / "optimizer.json", opt_meta)


def _prune(root: Path, keep: int) -> None:
    for old in sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))[:-keep]:
        discard_dir(old, require_marker=False)  # renamed aside first: a crash mid-delete leaves no half checkpoint


def load_checkpoint(path: str | Path, model: Any, optimizer: Any, accelerator: Any = None) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from `path` into live objects; returns the loop state.

    A sharded checkpoint is read by every process, each its own shard; it must be resumed on as
    many processes as wrote it."""
    import torch
    from safetensors.torch import load_file

    from qingzhou.errors import RecipeError

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    saved_shards = state.get("shards")
    sharded = accelerator is not None and is_sharded(model)
    world = accelerator.num_processes if sharded else None
    if saved_shards != world:
        made = f"{saved_shards} sharded processes" if saved_shards else "an unsharded run"
        now = f"{world} sharded processes" if world else "an unsharded run"
        raise RecipeError(f"checkpoint made by {made} cannot resume in {now}.", where=str(path),
                          hint="Resume with the launch config that made it, or start over in a new output folder.")
    shards = (accelerator.process_index, world) if sharded else None
    if sharded:
        reshard(model)
    weights = load_file(str(path / shard_name("trainable", shards)))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} has weights the model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, t in weights.items():
            target = local_view(params[n])
            target.copy_(t.to(target.device, target.dtype))
    opt = _unflatten_optimizer(load_file(str(path / shard_name("optimizer", shards))), json.loads((path / "optimizer.json").read_text()))
    if sharded:  # the shards back into DTensors laid out like their parameters
        by_index = [p for group in optimizer.param_groups for p in group["params"]]
        opt["state"] = {i: {k: shard_like(v, by_index[i]) for k, v in entry.items()} for i, entry in opt["state"].items()}
    optimizer.load_state_dict(opt)
    set_rng_states(load_file(str(path / shard_name("rng", shards))))
    return state
