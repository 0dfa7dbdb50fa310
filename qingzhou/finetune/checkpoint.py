"""Resumable checkpoints: trainable weights, optimizer state, RNG state and loop counters.

Everything is safetensors + JSON (no pickle, so a checkpoint from elsewhere cannot run code), and
each checkpoint folder appears atomically, so "the latest folder" is always a complete one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


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
            t = value.detach().to("cpu").contiguous()
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
                    keep: int = 2, *, root: str | Path | None = None) -> Path:
    """Write checkpoint `step` atomically under `root` (default `<output_dir>/checkpoints`) and
    prune all but the newest `keep`."""
    from safetensors.torch import save_file

    root = Path(root) if root is not None else checkpoint_root(output_dir)
    path = root / f"{PREFIX}{step:07d}"
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    rng = rng_states()
    with atomic_dir(path, overwrite=True, what="checkpoint") as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "optimizer.json", opt_meta)
        atomic_write_json(tmp / "state.json", {**loop_state, "step": step})
    for old in sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))[:-keep]:
        discard_dir(old, require_marker=False)  # renamed aside first: a crash mid-delete leaves no half checkpoint
    return path


def load_checkpoint(path: str | Path, model: Any, optimizer: Any) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from `path` into live objects; returns the loop state."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} has weights the model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    opt = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text()))
    optimizer.load_state_dict(opt)
    set_rng_states(load_file(str(path / "rng.safetensors")))
    return json.loads((path / "state.json").read_text())
