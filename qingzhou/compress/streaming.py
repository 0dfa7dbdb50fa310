"""Streaming compression: quantise or prune a model larger than memory, one decoder layer at a time.

The model is built on the meta device (accelerate's `init_empty_weights`): no weight is allocated.
The calibration engine (`calibrate.run_layerwise`, through `LayerwiseOptions.stream` or the
`streaming_layers` context the verbs open) then asks a `LayerStream` to

1. materialise the non-layer tensors (embeddings, final norm, lm_head) once, write them to their
   output shard, run the embeddings to capture layer 0's inputs, and release them again;
2. per decoder layer: materialise it from the source shards (read by name with `safe_open`, one
   shard file open at a time, so its pages are unmapped again), let the method's callback compress
   it exactly as in memory, write the layer in the method's saved form (GPTQ packed tensors for
   quantizers with `pack`, dense for pruners) to its own shard, checkpoint the layer's outputs
   (the next layer's inputs) and put the layer back on the meta device.

Peak memory is therefore about one layer (plus the method's per-layer statistics: Hessians) plus
the cached activations, whatever the depth of the model. The activations stay in RAM
(`activations="cpu"`) or live in a file-backed memory map (`"disk"`) for long calibration sets.

Output folder and resume. Everything is written into a work folder `.<out name>.streaming` next to
the output: one shard per decoder layer plus one for the rest (`model-0000k-of-0000n.safetensors`,
each written to a temp file and renamed), `progress.json` (layers finished, per-module results,
and a fingerprint of method config, source and calibration samples), and `acts-<k>.bin`, layer
k's inputs, plus `carried-<k>.bin` when the method carries activations of its own from layer to
layer (GPTQ's `dense_target`: the dense model's hidden states; a callback's `carried()` /
`restore_carried()`). When every layer is done the index, config.json and tokenizer are written, then the
marker, and the folder is renamed to the output: readers never see a half-written model. An
interrupted run (Ctrl-C, SIGKILL, power loss after the last fsync) called again with the same
arguments resumes at the first unfinished layer from the checkpointed activations: the bytes it
reads are those it would have computed, so the result is bit-identical to an uninterrupted run.
A different config, source or sample set starts afresh (the stale work folder is qingzhou's own).

The data-free methods (RTN, magnitude) are not engine callbacks; `run_per_layer` runs them on each
materialised layer with the plan restricted to that layer.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qingzhou.llm.host_memory import fix_mmap_threshold, trim_heap
from qingzhou.compress.calibrate import LayerBatch, active_stream, find_decoder_layers, streaming_layers  # noqa: F401 (re-exported)
from qingzhou.errors import ModelLoadError, RecipeError
from qingzhou.io import (
    MARKER,
    atomic_file,
    atomic_write_json,
    check_output_dir,
    fingerprint_path,
    write_marker,
)
from qingzhou.signals import fault_point

INDEX = "model.safetensors.index.json"
PROGRESS = "progress.json"
ACTIVATIONS = ("cpu", "disk")

# ---------------------------------------------------------------------------------------------- source


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
CHUNK = 32 << 20  # bytes per read/write when copying big tensors (embeddings) through


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file (absolute offsets)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensor table of a safetensors file (its JSON header; no data is read)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"not a readable safetensors file ({e}).", where=str(path)) from None
    base = 8 + n
    return {k: TensorInfo(path, v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


class ShardReader:
    """The tensors of a safetensors folder (one `model.safetensors`, or shards + index), by name.

    Tensors are read with plain file reads into fresh buffers, never through a memory map: the
    pages of shards larger than memory then stay in the page cache (which the kernel reclaims)
    instead of the process's resident set.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        single = self.folder / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"unreadable shard index ({e}).", where=str(index)) from None
            files = sorted({self.folder / f for f in weight_map.values()})
        elif single.exists():
            weight_map, files = None, [single]
        else:
            raise ModelLoadError("no safetensors weights (model.safetensors or model.safetensors.index.json).",
                                 where=str(self.folder),
                                 hint="Streaming reads Hugging Face safetensors folders; convert other formats first.")
        missing = [p.name for p in files if not p.exists()]
        if missing:
            raise ModelLoadError(f"the index names shard(s) that are missing: {', '.join(missing[:5])}.",
                                 where=str(index), hint="Copy the complete model folder.")
        self.info: dict[str, TensorInfo] = {}
        for path in files:
            self.info.update(read_header(path))
        if weight_map is not None:
            lost = [k for k in weight_map if k not in self.info]
            if lost:
                raise ModelLoadError(f"the index lists tensors no shard holds: {lost[:5]}.", where=str(index))

    def keys(self) -> list[str]:
        return list(self.info)

    def _check(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.info]
        if unknown:
            raise ModelLoadError(f"the checkpoint lacks {len(unknown)} tensor(s) the model needs: {unknown[:5]}.",
                                 where=str(self.folder), hint="Is the folder complete and of this architecture?")

    def read(self, names: Sequence[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """`names`' tensors (floating ones cast to `dtype`), each in its own fresh memory."""
        self._check(names)
        out: dict[str, torch.Tensor] = {}
        handles: dict[Path, Any] = {}
        try:
            for n in names:
                info = self.info[n]
                f = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb"))
                buf = bytearray(info.end - info.start)
                f.seek(info.start)
                if f.readinto(buf) != len(buf):
                    raise ModelLoadError(f"{n}: the shard ends early (truncated file?).", where=str(info.file))
                t = (torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8))
                t = t.view(_DTYPES[info.dtype]).reshape(info.shape)
                out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        finally:
            for f in handles.values():
                f.close()
        return out

    def mapped(self, name: str) -> torch.Tensor:
        """A read-only, zero-copy view of `name` mapped from its shard: only the pages a computation
        touches become resident (the embedding rows of the calibration tokens, say)."""
        import numpy as np

        self._check([name])
        info = self.info[name]
        if info.end == info.start:
            return torch.empty(info.shape, dtype=_DTYPES[info.dtype])
        raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.end - info.start,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable": it is only read
            t = torch.from_numpy(raw)
        return t.view(_DTYPES[info.dtype]).reshape(info.shape)

    def stored_dtype(self) -> torch.dtype:
        """The dtype of the first floating tensor (what `dtype=None` keeps)."""
        for info in self.info.values():
            dt = _DTYPES.get(info.dtype)
            if dt is not None and dt.is_floating_point:
                return dt
        return torch.float32


def copy_to_shard(reader: ShardReader, names: Sequence[str], path: Path, dtype: torch.dtype | None) -> dict[str, int]:
    """Write `names` from `reader` into a new safetensors shard `path` (atomically), CHUNK bytes at
    a time, casting floating tensors to `dtype`: embeddings of any size pass through without ever
    being held whole. Returns {"params", "zeros"} over what was written."""
    reader._check(names)
    plan = []
    for n in names:
        info = reader.info[n]
        src = _DTYPES[info.dtype]
        dst = dtype if dtype is not None and src.is_floating_point else src
        numel = 1
        for d in info.shape:
            numel *= d
        plan.append((n, info, src, dst, numel))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    at = 0
    for n, info, _src, dst, numel in plan:
        size = numel * torch.empty((), dtype=dst).element_size()
        header[n] = {"dtype": _NAMES[dst], "shape": list(info.shape), "data_offsets": [at, at + size]}
        at += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    stats = {"params": 0, "zeros": 0}
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as out:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            for n, info, src, dst, numel in plan:
                step = max(1, CHUNK // src.itemsize)
                with open(info.file, "rb") as f:
                    f.seek(info.start)
                    for first in range(0, numel, step):
                        count = min(step, numel - first)
                        buf = bytearray(count * src.itemsize)
                        if f.readinto(buf) != len(buf):
                            raise ModelLoadError(f"{n}: the shard ends early (truncated file?).", where=str(info.file))
                        t = torch.frombuffer(buf, dtype=torch.uint8).view(src)
                        stats["zeros"] += int((t == 0).sum())
                        t = t.to(dst) if dst != src else t
                        out.write(memoryview(t.view(torch.uint8).numpy()))
                stats["params"] += numel
    return stats


def open_meta_model(source: str | Path, dtype: str | torch.dtype | None = None) -> tuple[nn.Module, ShardReader, torch.dtype]:
    """A model of `source`'s config built on the meta device, the reader of its shards, and the
    dtype its weights are materialised in (`dtype` None/"auto": as stored)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise ModelLoadError("streaming needs a local Hugging Face folder (config.json + safetensors).",
                             where=str(source), hint="Download or save the model to a folder first.")
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelLoadError(f"config.json is not valid JSON ({e}).", where=str(folder / "config.json")) from None
    if raw.get("quantization_config"):
        raise RecipeError("this model is already quantised (config.json has a quantization_config).",
                          where=str(folder / "config.json"), hint="Stream the full-precision model instead.")
    reader = ShardReader(folder)
    if dtype is None or dtype == "auto":
        torch_dtype = reader.stored_dtype()
    elif isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    else:
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise RecipeError(f"unknown dtype {dtype!r}.", where="dtype", hint="auto, float32, float16 or bfloat16.")
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    return model, reader, torch_dtype


# ---------------------------------------------------------------------------------------------- helpers


def _layer_keys(module: nn.Module, prefix: str) -> list[str]:
    """State names (parameters and persistent buffers) of `module` under `prefix`."""
    return [f"{prefix}.{k}" for k in module.state_dict(keep_vars=True)]


def _materialise(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, t in tensors.items():
        set_module_tensor_to_device(model, name, "cpu", value=t)


def _release(module: nn.Module) -> None:
    """Back to the meta device: the memory of `module`'s tensors is freed, and so are the
    runtime caches packed layers keep as plain attributes (`QuantLinear`'s int4 packs and
    dequantised weights), which `.to("meta")` does not see."""
    from qingzhou.llm.quantized.qlinear import QuantLinear

    for m in module.modules():
        if isinstance(m, QuantLinear):
            m.clear_runtime()
    module.to("meta")


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors shard atomically (temp file in the folder, fsync, rename)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


def _jsonable(obj: Any) -> Any:
    """The JSON part of a method's per-module result (tensors and objects are dropped)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if _plain(v)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj if _plain(v)]
    return obj


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (dict, list, tuple)) and all(_plain(x) for x in (v.values() if isinstance(v, dict) else v)))


def samples_digest(samples: Sequence[torch.Tensor] | None) -> str:
    """sha256 over the calibration token ids (resume only with the very same samples)."""
    h = hashlib.sha256()
    for s in samples or ():
        t = torch.as_tensor(s).reshape(-1).to(torch.int64).contiguous()
        h.update(str(t.numel()).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def work_dir_for(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    return out.parent / f".{out.name}.streaming"


# ---------------------------------------------------------------------------------------------- stream


@dataclass
class LayerStats:
    """What a finished layer's shard holds, for the verbs' reports (the layer itself is gone)."""

    linears: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> zeros, numel, shape
    params: int = 0
    zeros: int = 0
    bytes: int = 0  # bytes written for the layer's linears (packed or dense)


class LayerStream:
    """Materialise, compress, write and release decoder layers (see the module doc).

    The engine calls `before_capture`, `after_capture`, then per layer `load`, `keep` (per output
    batch), `finish`. `finalize(index, layer, callback)`, set by the verb, turns a compressed layer
    into its saved form (quantize: packs `QuantLinear`s) before it is written.
    """

    def __init__(self, model: nn.Module, reader: ShardReader, output_dir: str | Path, *, dtype: torch.dtype,
                 activations: str = "cpu", overwrite: bool = False):
        if activations not in ACTIVATIONS:
            raise RecipeError(f"unknown activation store {activations!r}.", where="activations",
                              hint="cpu (RAM) or disk (memory-mapped file in the work folder).")
        self.model, self.reader, self.dtype, self.activations = model, reader, dtype, activations
        self.output_dir = check_output_dir(output_dir, overwrite)
        self.overwrite = overwrite
        self.work = work_dir_for(output_dir)
        layers, self.prefix = find_decoder_layers(model)
        self.n_layers = len(layers)
        self.layer_keys = [_layer_keys(layer, f"{self.prefix}.{i}") for i, layer in enumerate(layers)]
        in_layers = {k for keys in self.layer_keys for k in keys}
        self.rest_keys = [k for k in reader.keys() if k not in in_layers and not self._other_layer(k)]
        self.finalize: Callable[[int, nn.Module, Any], int | None] | None = None
        self.key: dict[str, Any] = {}  # what else the verb's result depends on (save format ...)
        self.tokenizer: Any = None  # the source folder's, used when the caller passes none
        self.done = 0
        self.modules: dict[str, dict[str, Any]] = {}  # per-module results of every finished layer
        self.stats: dict[int, LayerStats] = {}
        self.rest: dict[str, int] = {}
        self.fingerprint: dict[str, Any] = {}
        self.resumed_from = 0
        self.layers_loaded = 0  # materialised right now (the peak-memory test reads `max_loaded`)
        self.max_loaded = 0
        self._rest_loaded: list[str] = []
        self._shapes: list[tuple[int, ...]] = []
        self._act_dtype = dtype
        self._views: list[torch.Tensor] = []
        self._used = False

    def _other_layer(self, key: str) -> bool:
        """A source tensor of a decoder layer the meta model does not have (e.g. rotary caches)."""
        return key.startswith(self.prefix + ".") and key[len(self.prefix) + 1:].split(".")[0].isdigit()

    # -- file names
    def shard_name(self, k: int) -> str:
        """Shard k (1-based): layers 1..n, the rest n+1."""
        return f"model-{k:05d}-of-{self.n_layers + 1:05d}.safetensors"

    def _acts_path(self, index: int) -> Path:
        return self.work / f"acts-{index:05d}.bin"

    def _carried_path(self, index: int) -> Path:
        return self.work / f"carried-{index:05d}.bin"

    # -- resume bookkeeping
    def bind(self, fingerprint: dict[str, Any]) -> None:
        """Open (or resume) the work folder for a run identified by `fingerprint` (method config,
        dtype, calibration digest): a matching `progress.json` resumes, anything else restarts."""
        self.fingerprint = {**fingerprint, "source": fingerprint_path(self.reader.folder),
                            "dtype": str(self.dtype), "layers": self.n_layers}
        progress = self.work / PROGRESS
        if progress.exists():
            try:
                state = json.loads(progress.read_text(encoding="utf-8"))
            except ValueError:
                state = {}
            if state.get("fingerprint") == self.fingerprint and self._files_ok(int(state.get("done", 0))):
                self.done = self.resumed_from = int(state["done"])
                self.modules = state.get("modules", {})
                self.stats = {int(i): LayerStats(**s) for i, s in state.get("stats", {}).items()}
                self.rest = state.get("rest", {})
                for stray in self.work.glob(".*.tmp"):
                    stray.unlink(missing_ok=True)
                return
            warnings.warn(f"{self.work}: an unfinished streaming run with other settings; starting afresh",
                          stacklevel=2)
        if self.work.exists():
            if not (self.work / MARKER).exists():
                raise RecipeError("the streaming work folder exists but was not written by qingzhou.",
                                  where=str(self.work), hint="Move it away; qingzhou never deletes others' files.")
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        write_marker(self.work, "streaming compression (unfinished)")
        self._save_progress()

    def _files_ok(self, done: int) -> bool:
        if done == 0:
            return True
        shards = [*range(1, done + 1), self.n_layers + 1]
        acts = (self._acts_path(done).exists() or done == self.n_layers  # the last layer's outputs: unused
                or self.fingerprint.get("samples") is None)  # data-free: none
        return all((self.work / self.shard_name(k)).exists() for k in shards) and acts

    def _save_progress(self) -> None:
        atomic_write_json(self.work / PROGRESS, {
            "fingerprint": self.fingerprint, "done": self.done, "modules": self.modules,
            "stats": {i: s.__dict__ for i, s in self.stats.items()}, "rest": self.rest})

    # -- engine protocol
    def before_capture(self, model: nn.Module) -> None:
        """Materialise the non-layer tensors (embeddings ...) to run the model up to layer 0; the
        first time, write them to their shard."""
        if self._used:
            raise RecipeError("a streaming run walks the layers once; this method calls the engine twice.",
                              where="streaming", hint="Run this method in memory (without streaming).")
        self._used = True
        if not self.fingerprint:
            self.bind({})
        expected = [k for k in model.state_dict(keep_vars=True)
                    if k not in {x for keys in self.layer_keys for x in keys}]
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        missing = [k for k in expected if k not in self.rest_keys and not (tied and k.endswith("lm_head.weight"))]
        if missing:
            raise ModelLoadError(f"the checkpoint lacks {missing[:5]}.", where=str(self.reader.folder))
        wanted = set(expected)
        names = [k for k in self.rest_keys if k in wanted]
        rest_shard = self.work / self.shard_name(self.n_layers + 1)
        if not rest_shard.exists():
            self.rest = copy_to_shard(self.reader, names, rest_shard, self.dtype)
            self._save_progress()
        # only what runs before layer 0 (embeddings, rotary tables): lm_head and the final norm stay
        # on the meta device. Stored in the compute dtype, the embedding is mapped, not read: only
        # the rows of the calibration tokens become resident.
        parent = self.prefix.rpartition(".")[0]  # "model" for "model.layers"
        before = f"{parent}." if parent else ""
        needed = [k for k in names if k.startswith(before) and not self._other_layer(k)]
        mapped = {k for k in needed if _DTYPES[self.reader.info[k].dtype] == self.dtype}
        tensors = {k: self.reader.mapped(k) for k in mapped}
        tensors.update(self.reader.read([k for k in needed if k not in mapped], self.dtype))
        _materialise(model, tensors)
        self._rest_loaded = list(tensors)
        del tensors

    def after_capture(self, model: nn.Module, inputs: list[LayerBatch]) -> tuple[int, list[LayerBatch]]:
        """Release the non-layer tensors; on resume, replace the hidden states by the checkpointed
        inputs of the first unfinished layer. Returns (first layer to run, its inputs)."""
        from accelerate.utils import set_module_tensor_to_device

        for name in self._rest_loaded:
            set_module_tensor_to_device(model, name, "meta")
        self._rest_loaded = []
        self._shapes = [tuple(b.hidden.shape) for b in inputs]
        self._act_dtype = inputs[0].hidden.dtype if inputs else self.dtype
        if 0 < self.done < self.n_layers and inputs:
            inputs = [LayerBatch(h, b.kwargs) for h, b in zip(self._read_acts(self.done), inputs)]
        return self.done, inputs

    def load(self, index: int, layer: nn.Module) -> None:
        """Materialise decoder layer `index` from the source shards."""
        keys = self.layer_keys[index]
        tensors = self.reader.read(keys, self.dtype)
        prefix = f"{self.prefix}.{index}."
        _materialise(layer, {k[len(prefix):]: t for k, t in tensors.items()})
        self.layers_loaded += 1
        self.max_loaded = max(self.max_loaded, self.layers_loaded)

    def keep(self, index: int, batch: int, hidden: torch.Tensor, cache_device: torch.device) -> torch.Tensor:
        """Layer `index`'s output batch `batch`: copied into the checkpoint `acts-<index+1>` (made
        durable in `finish`) and returned as the next layer's input: in RAM on `cache_device`, or
        with `disk` the view of the file-backed map itself."""
        if batch == 0:
            self._views = self._map_acts(self._acts_tmp(index + 1), shared=True, create=True)
        view = self._views[batch]
        if hidden.dtype != view.dtype or tuple(hidden.shape) != tuple(view.shape):
            raise RecipeError(f"layer {index} changed its hidden states from {tuple(view.shape)} {view.dtype} to "
                              f"{tuple(hidden.shape)} {hidden.dtype}; streaming needs them constant.",
                              where="streaming", hint="Run this model in memory.")
        view.copy_(hidden)
        return view if self.activations == "disk" else hidden.to(cache_device)

    def _acts_tmp(self, index: int) -> Path:
        path = self._acts_path(index)
        return path.with_name(f".{path.name}.tmp")

    def _map_acts(self, path: Path, *, shared: bool, create: bool = False) -> list[torch.Tensor]:
        """Views [B, T, H] per batch of the activations file `path` (memory-mapped)."""
        sizes = [int(torch.Size(s).numel()) for s in self._shapes]
        total = sum(sizes)
        if create:
            with open(path, "wb") as f:
                f.truncate(total * torch.empty((), dtype=self._act_dtype).element_size())
        flat = torch.from_file(str(path), shared=shared, size=total, dtype=self._act_dtype)
        out, at = [], 0
        for s, n in zip(self._shapes, sizes):
            out.append(flat[at: at + n].view(s))
            at += n
        return out

    def _read_acts(self, index: int) -> list[torch.Tensor]:
        views = self._map_acts(self._acts_path(index), shared=False)
        return views if self.activations == "disk" else [v.clone() for v in views]

    def read_carried(self, index: int) -> list[torch.Tensor]:
        """The callback's carried activations checkpointed after layer `index - 1` (see `finish`)."""
        path = self._carried_path(index)
        if not path.exists():
            raise RecipeError(f"the checkpoint of layer {index} lacks {path.name}, the activations the method "
                              "carries between layers.", where=str(self.work),
                              hint="Delete this unfinished streaming folder (qingzhou wrote it) and run again.")
        return [v.clone() for v in self._map_acts(path, shared=False)]

    def _write_carried(self, index: int, tensors: list[torch.Tensor]) -> None:
        path = self._carried_path(index)
        tmp = path.with_name(f".{path.name}.tmp")
        views = self._map_acts(tmp, shared=True, create=True)
        for view, t in zip(views, tensors, strict=True):
            view.copy_(t)
        del views
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def finish(self, index: int, layer: nn.Module, callback: Any) -> None:
        """Write layer `index` in its saved form, checkpoint the progress, release the layer."""
        prefix = f"{self.prefix}.{index}"
        stats = LayerStats()
        dense = [m for m in layer.modules() if isinstance(m, nn.Linear)]  # `finalize` may replace them
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                stats.linears[f"{prefix}.{name}"] = {"zeros": int((w == 0).sum()), "numel": w.numel(),
                                                     "shape": list(w.shape)}
        linear_bytes = self.finalize(index, layer, callback) if self.finalize is not None else None
        results = getattr(callback, "results", None) or {}
        for name in list(results):
            if name.startswith(prefix + "."):
                self.modules[name] = _jsonable(results[name])
        state = {f"{prefix}.{k}": v.detach().cpu() for k, v in layer.state_dict().items()}
        stats.params = sum(t.numel() for t in state.values())
        stats.zeros = sum(int((t == 0).sum()) for t in state.values())
        linear_names = set(stats.linears)
        stats.bytes = linear_bytes if linear_bytes is not None else sum(
            t.numel() * t.element_size() for k, t in state.items() if k.rsplit(".", 1)[0] in linear_names)
        _save_shard(state, self.work / self.shard_name(index + 1))
        del state
        tmp = self._acts_tmp(index + 1)
        if tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self._acts_path(index + 1))
        if getattr(callback, "carries", False) and index + 1 < self.n_layers:  # as the engine restores them
            self._write_carried(index + 1, callback.carried())
        self._views = []
        self.stats[index] = stats
        self.done = index + 1
        self._save_progress()
        self._acts_path(index).unlink(missing_ok=True)
        self._carried_path(index).unlink(missing_ok=True)
        _release(layer)
        for m in dense:  # replaced ones too: a caller's reference must not keep their weights alive
            _release(m)
        trim_heap()
        self.layers_loaded -= 1

    # -- output
    def commit(self, model: nn.Module, tokenizer: Any = None, config_extra: dict[str, Any] | None = None) -> Path:
        """All layers done: write index, config, tokenizer and marker, then rename the work folder
        to the output folder (replacing a folder qingzhou wrote only with `overwrite`)."""
        if self.done != self.n_layers:
            raise RecipeError(f"streaming stopped after {self.done} of {self.n_layers} layers.", where=str(self.work))
        from safetensors import safe_open

        weight_map: dict[str, str] = {}
        total = 0
        for k in range(1, self.n_layers + 2):
            name = self.shard_name(k)
            with safe_open(str(self.work / name), "pt") as f:
                for key in f.keys():
                    weight_map[key] = name
                    sl = f.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * _dtype_size(sl.get_dtype())
        atomic_write_json(self.work / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        config.update(config_extra or {})
        atomic_write_json(self.work / "config.json", config)
        for f in ("generation_config.json",):
            if (self.reader.folder / f).exists():
                shutil.copyfile(self.reader.folder / f, self.work / f)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.work)
        else:
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
                if (self.reader.folder / f).exists():
                    shutil.copyfile(self.reader.folder / f, self.work / f)
        for p in [*self.work.glob("acts-*.bin"), *self.work.glob("carried-*.bin")]:
            p.unlink()
        write_marker(self.work, "streamed compressed model")
        out = self.output_dir
        fault_point(f"commit {out.name}")
        if out.exists():
            check_output_dir(out, self.overwrite)
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".tmp", dir=out.parent))
            os.replace(out, aside)
            os.replace(self.work, out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(self.work, out)
        (out / PROGRESS).unlink()  # kept until here: a run stopped just before resumes at the commit
        return out

    # -- numbers for the verbs
    def linear_stats(self) -> dict[str, dict[str, Any]]:
        return {n: s for st in self.stats.values() for n, s in st.linears.items()}

    def totals(self) -> tuple[int, int]:
        """(parameters, zeros) written over the whole model (tied weights once)."""
        params = sum(s.params for s in self.stats.values()) + int(self.rest.get("params", 0))
        zeros = sum(s.zeros for s in self.stats.values()) + int(self.rest.get("zeros", 0))
        return params, zeros


def _dtype_size(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(name, 4)


# ---------------------------------------------------------------------------------------------- verbs


def open_stream(source: str | Path, output_dir: str | Path | None, *, dtype: str | torch.dtype | None = None,
                activations: str = "cpu", overwrite: bool = False) -> LayerStream:
    """The meta model of `source` and the stream that will write `output_dir` (required)."""
    if output_dir is None:
        raise RecipeError("streaming writes its result layer by layer and needs an output folder.",
                          where="output_dir", hint="Pass output_dir= (CLI: OUT_DIR).")
    if not isinstance(source, (str, Path)):
        raise RecipeError("streaming takes the model as a folder path, not a loaded model.", where="model",
                          hint="Pass the Hugging Face folder; the model is built on the meta device from it.")
    fix_mmap_threshold()  # layer-sized temporaries go back to the OS when freed (host_memory.py)
    model, reader, torch_dtype = open_meta_model(source, dtype)
    stream = LayerStream(model, reader, output_dir, dtype=torch_dtype, activations=activations, overwrite=overwrite)
    stream.tokenizer = _folder_tokenizer(Path(source))
    return stream


def _folder_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in `folder` (for calibration text and the output), or None."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def run_per_layer(stream: LayerStream, plan: dict[str, Any], fn: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """A data-free method (RTN, magnitude: no engine callback) on one materialised layer at a time:
    `fn(sub_plan)` gets the plan restricted to that layer. Returns the merged method result."""
    model = stream.model
    stream.before_capture(model)
    layers, _ = find_decoder_layers(model)
    stream.after_capture(model, [])
    merged: dict[str, Any] = {"modules": {}}
    for i in range(stream.done, len(layers)):
        prefix = f"{stream.prefix}.{i}."
        sub = {n: s for n, s in plan.items() if n.startswith(prefix)}
        stream.load(i, layers[i])
        done = _LayerResults(fn(sub).get("modules", {}) if sub else {})
        stream.finish(i, layers[i], done)  # `finish` reads (and `finalize` takes codes from) `.results`
        merged["modules"].update(done.results)
    return merged


@dataclass
class _LayerResults:
    """A data-free method's per-module results for one layer, shaped like an engine callback's."""

    results: dict[str, Any]


def check_streamable(entry_meta: dict[str, Any], cfg: Any, save_format: str = "dense") -> None:
    """Refuse, before any work, what streaming cannot do (one clear paragraph each)."""
    if entry_meta.get("reshapes"):
        raise RecipeError(f"{cfg.method} changes the model's shapes and cannot stream.", where="streaming",
                          hint="Run it in memory.")
    if getattr(cfg, "owl", None) is not None:
        raise RecipeError("OWL needs a full pass over the model before pruning and cannot stream.",
                          where="owl", hint="Drop owl or run in memory.")
    if cfg.method == "bnb":
        raise RecipeError("bitsandbytes quantises at load time and has nothing to stream.", where="method",
                          hint="Load with qingzhou.llm.load_bnb instead.")
    if save_format not in ("gptq", "dense"):
        raise RecipeError(f"streaming writes safetensors folders; save_format {save_format!r} is not one.",
                          where="save_format", hint="Use gptq or dense, then export.")

