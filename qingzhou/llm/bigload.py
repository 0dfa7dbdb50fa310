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
engine reuses (see the issue-20 notes in docs/architecture.md).
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qingzhou.errors import ModelLoadError, QingzhouError

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_PAGE = mmap.PAGESIZE
_MADV_WILLNEED, _MADV_DONTNEED, _MADV_POPULATE_READ = 3, 4, 22  # Linux values


class BudgetError(QingzhouError):
    """The memory budget cannot hold what must be resident at once (a decoder layer)."""


def _libc_madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return fn
    except (OSError, AttributeError):  # not a Unix libc: read-ahead hints become no-ops
        return None


_MADVISE = _libc_madvise()


class ShardIndex:
    """The tensors of a folder's safetensors shards, memory-mapped: name -> zero-copy CPU tensor.

    The headers are parsed here (8-byte length + JSON, the safetensors format), so a tensor is a
    view of the mapped file: reading a layer costs page-cache reads, not a copy, and `release`
    hands the pages back (the process's resident set stays about one layer). ctypes' madvise
    runs without the GIL, so `prefetch` in a background thread overlaps the main thread's compute.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{INDEX_FILE} cannot be read ({e}).", where=str(index)) from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise ModelLoadError(f"{len(missing)} shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing[:4])}.",
                                     where=str(self.folder), hint="Copy the complete model folder (every model-*.safetensors).")
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise ModelLoadError("no *.safetensors weights in this folder.", where=str(self.folder))
        self._entries: dict[str, tuple[str, torch.dtype, list[int], int, int]] = {}
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}
        for f in files:
            self._read_header(f)

    def _read_header(self, name: str) -> None:
        path = self.folder / name
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ModelLoadError(f"shard {name} is not a readable safetensors file ({e}).", where=str(path)) from None
        size = path.stat().st_size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = (8 + n + o for o in info["data_offsets"])
            if end > size:
                raise ModelLoadError(f"shard {name} is truncated (tensor {key} ends at byte {end}, the file has {size}).",
                                     where=str(path), hint="Copy the file again; a download or copy was cut short.")
            self._entries[key] = (name, _DTYPES[info["dtype"]], list(info["shape"]), begin, end)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def nbytes(self, name: str) -> int:
        _, _, _, b, e = self._entries[name]
        return e - b

    def meta(self, name: str) -> tuple[torch.dtype, list[int], int, str]:
        """(dtype, shape, nbytes, file) of one tensor, without reading it."""
        f, dtype, shape, b, e = self._entries[name]
        return dtype, shape, e - b, str(self.folder / f)

    def layer_names(self, prefix: str) -> list[str]:
        """Tensor names under a module prefix ("model.layers.3" -> "model.layers.3.*")."""
        prefix = prefix.rstrip(".") + "."
        return [n for n in self._entries if n.startswith(prefix)]

    def _map(self, file: str) -> tuple[mmap.mmap, int]:
        if file not in self._maps:
            with open(self.folder / file, "rb") as fh:
                m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "buffer is not writable": the views are read-only by design
                base = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
            self._maps[file] = (m, base)
        return self._maps[file]

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a read-only view of the mapped shard (clone or `.to()` it before writing)."""
        if name not in self._entries:
            raise ModelLoadError(f"tensor {name} is not in any shard.", where=str(self.folder))
        f, dtype, shape, b, e = self._entries[name]
        if e == b:
            return torch.empty(shape, dtype=dtype)
        m, _ = self._map(f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(m, dtype=torch.uint8, count=e - b, offset=b)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if b % itemsize:  # unaligned (after an odd-sized tensor): copy rather than view
            flat = flat.clone()
        return flat.view(dtype).reshape(shape)

    def _advise(self, names: Iterable[str], advice: int) -> None:
        if _MADVISE is None:
            return
        for name in names:
            f, _, _, b, e = self._entries[name]
            if e == b:
                continue
            _, base = self._map(f)
            start = (base + b) // _PAGE * _PAGE
            if _MADVISE(ctypes.c_void_p(start), base + e - start, advice) != 0 and advice == _MADV_POPULATE_READ:
                _MADVISE(ctypes.c_void_p(start), base + e - start, _MADV_WILLNEED)  # kernel < 5.14

    def prefetch(self, names: Iterable[str]) -> None:
        """Read these tensors' bytes into memory now (blocking; call it from a background thread)."""
        self._advise(names, _MADV_POPULATE_READ)

    def release(self, names: Iterable[str]) -> None:
        """Give these tensors' pages back (they stay in the page cache; views stay valid, re-read on use)."""
        self._advise(names, _MADV_DONTNEED)

    def close(self) -> None:
        for m, _ in self._maps.values():
            try:
                m.close()
            except BufferError:  # views still alive: the mapping goes with them
                pass
        self._maps.clear()


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"config.json cannot be read ({e}).", where=str(path)) from None


def meta_model(folder: str | Path, dtype: torch.dtype = torch.float32, index: ShardIndex | None = None) -> nn.Module:
    """The architecture of `folder` on the meta device; packed `QuantLinear` layers (meta buffers)
    where a GPTQ-layout checkpoint has `.qweight` tensors. Allocates no weight."""
    from accelerate import init_empty_weights, init_on_device
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
    if qc and qc.get("quant_method") == "gptq":
        from qingzhou.llm.quantized.gptq_layout import QUANT_ATTR, _group_size
        from qingzhou.llm.quantized.qlinear import QuantLinear

        index = index or ShardIndex(folder)
        with init_on_device(torch.device("meta"), include_buffers=True):
            for prefix in sorted({n[: -len(".qweight")] for n in index.names if n.endswith(".qweight")}):
                _, (in_f,), _, _ = index.meta(f"{prefix}.g_idx")
                _, (rows, out_f), _, _ = index.meta(f"{prefix}.qweight")
                _, (n_groups, _), _, _ = index.meta(f"{prefix}.scales")
                bits = rows // -(-in_f // 32)
                bias = f"{prefix}.bias" in index
                layer = QuantLinear(in_f, out_f, bits, _group_size(qc, prefix), bias=bias, n_groups=n_groups)
                if bias:  # keeps the checkpoint's bias dtype, as load_quantized always did
                    layer.bias = torch.empty(out_f, dtype=index.meta(f"{prefix}.bias")[0], device="meta")
                model.set_submodule(prefix, layer)
        setattr(model, QUANT_ATTR, qc)
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


def _tied_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()


def _target_dtype(model: nn.Module, name: str, value: torch.Tensor) -> torch.dtype:
    """What dtype the model's (meta) tensor `name` has: floats are cast to it, integers kept."""
    current = _get_tensor(model, name)
    return current.dtype if value.is_floating_point() and current.is_floating_point() else value.dtype


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name) if module_name else model, leaf)


def materialize(model: nn.Module, prefix: str, index: ShardIndex, device: Any = "cpu") -> None:
    """Fill every tensor of submodule `prefix` ("" = the whole model) from the shards, on `device`,
    cast to the dtype the model declares for it (accelerate's `set_module_tensor_to_device`)."""
    from accelerate.utils import set_module_tensor_to_device

    module = model.get_submodule(prefix) if prefix else model
    names = [f"{prefix}.{n}" if prefix else n for n, _ in _persistent_tensors(module)]
    tied = _tied_names(model)
    missing = [n for n in names if n not in index and n not in tied]
    if missing:
        raise ModelLoadError(f"{len(missing)} tensor(s) the architecture needs are not in the checkpoint: "
                             f"{', '.join(missing[:6])}.", where=str(index.folder))
    for name in names:
        if name not in index:
            continue
        value = index.tensor(name)
        value = value.to(device=device, dtype=_target_dtype(model, name, value), copy=True)
        set_module_tensor_to_device(model, name, device, value=value)


def check_names(model: nn.Module, index: ShardIndex, strict: bool = True) -> None:
    """ModelLoadError when the shards do not fill the architecture: tensors missing (always: a
    meta tensor cannot run) or, when `strict`, tensors the architecture does not use."""
    expected = {n for n, _ in _persistent_tensors(model)}
    tied = _tied_names(model)
    missing = sorted(n for n in expected - set(index.names) if n not in tied)
    unexpected = sorted(set(index.names) - expected) if strict else []
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) the architecture needs are missing ({', '.join(missing[:6])})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) are not used by the architecture ({', '.join(unexpected[:6])})")
        raise ModelLoadError("the weights do not match the architecture in config.json: " + "; ".join(parts) + ".",
                             where=str(index.folder), hint="Check that config.json belongs to these shards.")


def release(model: nn.Module, prefix: str) -> None:
    """Send the tensors of submodule `prefix` back to the meta device (their memory is freed)."""
    from accelerate.utils import set_module_tensor_to_device

    module = model.get_submodule(prefix) if prefix else model
    for n, _ in _persistent_tensors(module):
        set_module_tensor_to_device(model, f"{prefix}.{n}" if prefix else n, "meta")


def _persistent_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers (what a checkpoint holds), by qualified name."""
    out = list(module.named_parameters())
    for mod_name, mod in module.named_modules():
        for b_name, b in mod.named_buffers(recurse=False):
            if b_name not in getattr(mod, "_non_persistent_buffers_set", set()):
                out.append((f"{mod_name}.{b_name}" if mod_name else b_name, b))
    return out


def decoder_layers(model: nn.Module) -> list[str]:
    """Module names of the blocks accelerate never splits (the decoder layers), in forward order."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    return [n for n, m in model.named_modules() if type(m).__name__ in classes]


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
    if device != "cpu":
        memory.setdefault("cpu", 0)  # stream from the shards rather than pin the rest in RAM unasked
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=list(
        getattr(model, "_no_split_modules", None) or ()), dtype=dtype)
    return _split_to_layers(model, {k: (v if isinstance(v, str) else device) for k, v in device_map.items()})


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
             prefetch: bool = True, strict: bool = True) -> nn.Module:
    """Build `folder`'s model on the meta device and place it within `max_memory` (see module doc).

    `device_map`: None/"auto" (plan from `max_memory`) or an explicit accelerate map
    {module: device | "cpu" | "disk"}. Offloaded layers stream from the safetensors shards in
    place; `offload_folder` (default: under $QINGZHOU_CACHE/offload) holds only what the shards
    cannot serve directly: streamed 4-bit layers in the int4 kernel's layout (`offload.KernelCache`). The model is in eval mode with
    `qingzhou_offload` set to a summary {device_map, resident_bytes, streamed_bytes}.
    """
    from accelerate import dispatch_model

    index = ShardIndex(folder)
    model = meta_model(folder, dtype, index=index)
    check_names(model, index, strict)
    budget = parse_max_memory(max_memory, device)
    if isinstance(device_map, dict):
        placement = {k: v for k, v in device_map.items()}
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
        # what streams is "disk" to accelerate: served from the mapped shards (the page cache) by
        # the Streamer, whether the plan said cpu or disk
        dispatch_model(model, {k: ("disk" if k in streamed else v) for k, v in placement.items()}, main_device=str(device), offload_index=offload_index,
                       offload_dir=str(offload_folder) if offload_folder else None, offload_buffers=True,
                       force_hooks=True, preload_module_classes=list(getattr(model, "_no_split_modules", None) or ()))
        attach_streamer(model, index, streamed, device, prefetch=prefetch, kernels=kernels)
    resident = sum(index.nbytes(n) for m in placement if m not in streamed for n in names_by_module[m])
    model.qingzhou_offload = {"device_map": placement, "streamed_modules": streamed,
                              "resident_bytes": resident,
                              "streamed_bytes": sum(index.nbytes(n) for n in offload_index)}
    model.qingzhou_shards = index
    return model
