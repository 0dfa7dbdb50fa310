"""A model folder's safetensors shards, memory-mapped, and filling a meta-device module from them.

The loader of big models (`bigload.py`), the offload streamer (`offload.py`) and the streaming
compression engine all read weights through here: `ShardIndex` maps every shard once and hands out
zero-copy tensor views; `materialize` / `release` move one submodule between the meta device and
real memory with accelerate's `set_module_tensor_to_device`.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qingzhou.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_PAGE = mmap.PAGESIZE
_MADV_WILLNEED, _MADV_DONTNEED = 3, 4  # Linux values


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
    hands the pages back (the process's resident set stays about one layer); `will_need` asks the
    kernel to read pages ahead without waiting for them.
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
            _MADVISE(ctypes.c_void_p(start), base + e - start, advice)

    def will_need(self, names: Iterable[str]) -> None:
        """Ask the kernel to read these tensors' pages ahead (returns at once; no-op when cached)."""
        self._advise(names, _MADV_WILLNEED)

    def release(self, names: Iterable[str]) -> None:
        """Give these tensors' pages back (they stay in the page cache; views stay valid, re-read on use)."""
        self._advise(names, _MADV_DONTNEED)

    def read_into(self, names: list[str], buffer: torch.Tensor, align: int = 64) -> dict[str, torch.Tensor]:
        """Read these tensors from their shards into `buffer` (a uint8 CPU tensor, reused across
        calls) with pread, which copies from the page cache (or the disk) without the GIL and
        without faulting new pages in; returns views of the buffer. `nbytes_for(names)` sizes it."""
        out: dict[str, torch.Tensor] = {}
        offset = 0
        base = buffer.data_ptr()
        for name in names:
            f, dtype, shape, b, e = self._entries[name]
            n = e - b
            view = (ctypes.c_char * max(n, 1)).from_address(base + offset)
            with open(self.folder / f, "rb", buffering=0) as fh:
                done = 0
                while done < n:  # one read returns at most ~2 GiB
                    got = os.preadv(fh.fileno(), [memoryview(view)[done:n]], b + done)
                    if got <= 0:
                        raise ModelLoadError(f"shard {f} ended early while reading {name}.", where=str(self.folder / f))
                    done += got
            out[name] = buffer[offset: offset + n].view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
            offset += -(-n // align) * align
        return out

    def read(self, name: str) -> torch.Tensor:
        """A new CPU tensor holding `name`, read with pread: unlike `tensor`, no page of the
        mapping is touched, so the process's resident set holds only this copy."""
        if name not in self._entries:
            raise ModelLoadError(f"tensor {name} is not in any shard.", where=str(self.folder))
        buf = torch.empty(max(self.nbytes(name), 1), dtype=torch.uint8)
        return self.read_into([name], buf)[name]

    def nbytes_for(self, names: Iterable[str], align: int = 64) -> int:
        """Buffer bytes `read_into` needs for these tensors."""
        return sum(-(-self.nbytes(n) // align) * align for n in names)

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


def _tied_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()


def tied_sources(model: nn.Module) -> dict[str, str]:
    """Tied tensors the checkpoint stores once: {name in the model: name in the shards}
    (lm_head.weight -> model.embed_tokens.weight)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if not getattr(model.config, "tie_word_embeddings", False) or not isinstance(tied, dict):
        return {}
    return {k: v for k, v in tied.items() if isinstance(v, str)}


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
        value = index.read(name)
        value = value.to(device=device, dtype=_target_dtype(model, name, value))
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
