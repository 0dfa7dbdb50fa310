"""Load a model bigger than the memory budget: meta-device build, shards mapped, layers placed.

The model is built on the meta device (accelerate's `init_empty_weights`), so no dense weight is
allocated up front. accelerate's `infer_auto_device_map` places whole decoder layers on the compute
device, the CPU or "disk" within `max_memory`; the tensors of resident layers are copied in from the
memory-mapped safetensors shards with accelerate's `set_module_tensor_to_device`, and `dispatch_model`
attaches accelerate's offload hooks to the rest. Offloaded layers are read from the checkpoint's
own shards in place (nothing is copied to an offload folder for a safetensors source), and
`llm/offload.py` feeds those hooks with read-ahead, so the next layer's bytes arrive while the
current layer computes.

A GPTQ-layout checkpoint is built with packed `QuantLinear` layers on the meta device too, so its
dense weights never exist; 4-bit layers therefore stream a quarter of the bytes of bf16 ones.

`ShardIndex`, `meta_model`, `materialize` and `release` are the pieces the streaming compression
engine reuses (`ShardIndex`, `materialize`, `release` live in `shards.py`).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qingzhou.errors import QingzhouError
from qingzhou.llm.shards import (INDEX_FILE, ShardIndex, _persistent_tensors, _tied_names, check_names,  # noqa: F401
                                 decoder_layers,
                                 materialize, read_config, release)

QuantLayers = Callable[[nn.Module, dict, ShardIndex], None]


class BudgetError(QingzhouError):
    """The memory budget cannot hold what must be resident at once (a decoder layer)."""


def meta_model(folder: str | Path, dtype: torch.dtype = torch.float32, index: ShardIndex | None = None,
               quant_layers: QuantLayers | None = None) -> nn.Module:
    """The architecture of `folder` on the meta device. Allocates no weight.

    A quantized checkpoint (config.json has `quantization_config`) needs `quant_layers(model,
    quantization_config, index)` to put its packed layers in place (on meta too): for the GPTQ
    layout that is `gptq_layout.install_meta_layers`, which `gptq_layout.load_quantized` passes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = read_config(folder)
    qc = raw.pop("quantization_config", None)
    config = AutoConfig.for_model(**raw)
    # include_buffers: every tensor is created on meta (accelerate's default creates each
    # parameter on the CPU, then moves it: a transient dense allocation per weight)
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _real_non_persistent_buffers(model)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if qc and quant_layers is not None:
        quant_layers(model, qc, index or ShardIndex(folder))
    return model


def _real_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers no checkpoint holds (rotary `inv_freq`) are computed, on the CPU, by the model's own
    `_init_weights`, as transformers does after its meta-device build."""
    for module in model.modules():
        names = [n for n in module._non_persistent_buffers_set
                 if getattr(module, n, None) is not None and getattr(module, n).is_meta]
        if not names:
            continue
        for n in names:
            setattr(module, n, torch.empty_like(getattr(module, n), device="cpu"))
        with torch.no_grad():
            model._init_weights(module)


# ---------------------------------------------------------------- budgets and placement

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any, where: str = "max_memory") -> int:
    """'6GiB' / '1.5GB' / '800MiB' / 2**30 -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetError(f"cannot read the memory size {value!r}.", where=where,
                          hint="Write it like 6GiB, 1.5GB or 800MiB (a plain number is bytes).")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_max_memory(value: Any, device: str) -> dict[Any, int] | None:
    """`max_memory` as accelerate wants it: {device index or "cpu": bytes}.

    Accepts a dict, "6GiB" (the compute device's budget) or "cuda:0=6GiB,cpu=12GiB"."""
    if value is None or value == {} or value == "":
        return None
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, str) and "=" in value:
        items = [tuple(part.split("=", 1)) for part in value.split(",") if part.strip()]
    else:
        items = [(device, value)]
    out: dict[Any, int] = {}
    for key, size in items:
        key = str(key).strip()
        if key == "disk":
            continue
        out[_accelerate_key(key)] = parse_size(size, where=f"max_memory {key}")
    return out


def _accelerate_key(device: str) -> Any:
    """accelerate's keys: "cpu", "mps", or a device index for the other accelerators."""
    if device in ("cpu", "mps"):
        return device
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan_device_map(model: nn.Module, device: str, max_memory: dict[Any, int] | None,
                    dtype: torch.dtype) -> dict[str, Any]:
    """accelerate's `infer_auto_device_map` within `max_memory`, after checking that the compute
    device can hold the largest decoder layer (else nothing could ever run): BudgetError names it."""
    from accelerate.utils import compute_module_sizes, infer_auto_device_map

    if not max_memory:
        return {"": device}
    sizes = compute_module_sizes(model, dtype=dtype)
    layers = decoder_layers(model) or [n for n, _ in model.named_children()]
    largest = max(layers, key=lambda n: sizes.get(n, 0))
    key = _accelerate_key(device)
    budget = max_memory.get(key)
    if budget is not None and budget < sizes[largest]:
        raise BudgetError(
            f"the memory budget for {device} ({_fmt(budget)}) is smaller than the largest layer, "
            f"{largest} ({_fmt(sizes[largest])}): one layer must fit to compute it.",
            where="max_memory", hint=f"Raise the budget to at least {_fmt(sizes[largest])} plus room for activations, "
                                     "or quantize the model to 4 bits (a quarter of the bytes per layer).")
    memory = dict(max_memory)
    if budget is not None and budget >= 2 * sizes[largest]:
        # accelerate keeps room for one streamed layer; the read-ahead buffer is a second one
        memory[key] = budget - sizes[largest]
    if device != "cpu":
        memory.setdefault("cpu", 0)  # stream from the shards rather than pin the rest in RAM unasked
    shadows = _pack_shadows(model, device, dtype)
    try:
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=list(
            getattr(model, "_no_split_modules", None) or ()), dtype=dtype)
    finally:
        for m in shadows:
            delattr(m, _SHADOW)  # also drops it from the non-persistent set
    return _split_to_layers(model, {k: (v if isinstance(v, str) else device) for k, v in device_map.items()})


_SHADOW = "_qingzhou_int4pack_shadow"


def _pack_shadows(model: nn.Module, device: str, dtype: torch.dtype) -> list[nn.Module]:
    """Meta buffers the size of what each resident 4-bit layer adds on its first forward
    (`QuantLinear.fast_kernel`), so accelerate's placement counts it. On the CPU the layer then
    drops its GPTQ `qweight` for the pack, which holds the same codes (`compact_when_packed`, set by
    `load_quantized` on resident layers): what it adds is the pack's bf16 scale/zero pairs. On an
    accelerator it keeps both, about twice its checkpoint bytes. (A streamed layer carries only the
    pack.) Only the planning sees them; the caller deletes them after."""
    from qingzhou.llm.quantized.int4_kernel import supported, why_not_shape
    from qingzhou.llm.quantized.qlinear import QuantLinear

    if not supported(torch.device(device).type, dtype):
        return []
    out = []
    for m in model.modules():
        if not (isinstance(m, QuantLinear) and m.kernel != "dequant"
                and why_not_shape(m.bits, m.group_size, m.in_features, m.out_features) is None):
            continue
        # bf16 scale/zero pairs, + the packed codes (as many bytes as qweight) where qweight stays
        nbytes = m.scales.numel() * 4 + (0 if torch.device(device).type == "cpu" else m.qweight.numel() * 4)
        m.register_buffer(_SHADOW, torch.empty(nbytes, dtype=torch.uint8, device="meta"), persistent=False)
        out.append(m)
    return out


def _split_to_layers(model: nn.Module, device_map: dict[str, Any]) -> dict[str, Any]:
    """accelerate merges neighbours on the same device ("model.layers": "disk"); streaming goes
    layer by layer, so a module holding decoder layers is replaced by its children."""
    layers = decoder_layers(model)
    out: dict[str, Any] = {}
    todo = list(device_map.items())
    while todo:
        name, where = todo.pop(0)
        if any(layer.startswith(name + ".") or (name == "" and layer) for layer in layers):
            module = model.get_submodule(name) if name else model
            kids = [(f"{name}.{c}" if name else c, where) for c, _ in module.named_children()]
            direct = [(f"{name}.{n}" if name else n) for n, _ in module.named_parameters(recurse=False)]
            if direct:  # tensors held by the container itself cannot be split off
                out[name] = where
                continue
            todo = kids + todo
        else:
            out[name] = where
    return out


def load_big(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
             max_memory: Any = None, device_map: Any = None, offload_folder: str | Path | None = None,
             prefetch: bool = True, strict: bool = True, quant_layers: QuantLayers | None = None) -> nn.Module:
    """Build `folder`'s model on the meta device and place it within `max_memory` (see module doc).

    `device_map`: None/"auto" (plan from `max_memory`) or an explicit accelerate map
    {module: device | "cpu" | "disk"}. Offloaded layers stream from the safetensors shards in
    place; `offload_folder` (default: under $QINGZHOU_CACHE/offload) holds only what the shards
    cannot serve directly: streamed 4-bit layers in the int4 kernel's layout (`offload.KernelCache`). The model is in eval mode with
    `qingzhou_offload` set to a summary {device_map, resident_bytes, streamed_bytes}.
    """
    from accelerate import dispatch_model

    index = ShardIndex(folder)
    model = meta_model(folder, dtype, index=index, quant_layers=quant_layers)
    check_names(model, index, strict)
    budget = parse_max_memory(max_memory, device)
    if isinstance(device_map, dict):
        placement = _split_to_layers(model, {k: (v if isinstance(v, str) else device) for k, v in device_map.items()})
    else:
        placement = plan_device_map(model, device, budget, dtype)
    streamed = [m for m, d in placement.items() if d == "disk" or (d == "cpu" and device != "cpu")]
    tied = _tied_names(model)
    names_by_module = {m: (index.layer_names(m) if m else index.names) for m in placement}
    for module_name, where in placement.items():
        if module_name in streamed:
            continue
        materialize(model, module_name, index, "cpu" if where == "cpu" else device)
    offload_index = {}
    for module_name in streamed:
        for name in names_by_module[module_name]:
            d, shape, _, file = index.meta(name)
            offload_index[name] = {"safetensors_file": file, "weight_name": name,
                                   "dtype": str(d).replace("torch.", ""), "shape": shape}
    # non-persistent buffers (rotary inv_freq) were built for real; tied weights follow their source
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    if streamed:
        from qingzhou.llm.offload import attach_streamer, build_kernel_cache

        kernels = build_kernel_cache(model, index, streamed, device, dtype, offload_folder)
        layers = set(decoder_layers(model))
        sizes = [sum(index.nbytes(n) for n in names_by_module[m]) for m in streamed if m in layers]
        budget_main = (budget or {}).get(_accelerate_key(device))
        # read-ahead needs a second layer-sized buffer; a budget of one layer streams without it
        prefetch = prefetch and (budget_main is None or budget_main >= 2 * max(sizes, default=0))
        # what streams is "disk" to accelerate: served from the mapped shards (the page cache) by
        # the Streamer, whether the plan said cpu or disk
        dispatch_model(model, {k: ("disk" if k in streamed else v) for k, v in placement.items()}, main_device=str(device), offload_index=offload_index,
                       offload_dir=str(offload_folder) if offload_folder else None, offload_buffers=True,
                       force_hooks=True, preload_module_classes=list(getattr(model, "_no_split_modules", None) or ()))
        attach_streamer(model, index, streamed, device, prefetch=prefetch, kernels=kernels)
    resident = sum(index.nbytes(n) for m in placement if m not in streamed for n in names_by_module[m])
    model.qingzhou_offload = {"device": str(device), "device_map": placement, "streamed_modules": streamed,
                              "resident_bytes": resident,
                              "streamed_bytes": sum(index.nbytes(n) for n in offload_index)}
    model.qingzhou_shards = index
    return model
