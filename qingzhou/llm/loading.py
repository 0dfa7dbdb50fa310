"""Load a causal LM and its tokenizer from an alias, a local folder, a .gguf file or a hub id.

Safety defaults: pickle weights (`.bin`, `.pt`) are refused and `trust_remote_code` is off unless
the caller asks, since both run arbitrary code from the model's author. Loading is strict: a
checkpoint whose tensors do not match the architecture its config describes (missing, unexpected
or mis-shaped tensors) is an error naming them, not a model with randomly initialised layers.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qingzhou.errors import ModelLoadError
from qingzhou.llm.aliases import ALIASES, resolve_alias
from qingzhou.llm.gguf_meta import record_gguf_tokenizer
from qingzhou.paths import is_hub_id


def quantized_loaders() -> dict[str, Callable[..., Any]]:
    """Quantized checkpoints qingzhou loads itself (pure-torch kernels that run on every device)
    instead of handing them to transformers' optional GPU-only backends: quant_method -> loader.
    (Imported on use: this module stays torch-free so recipes validate before torch loads.)"""
    from qingzhou.llm.quantized.gptq_layout import load_quantized

    return {"gptq": load_quantized}


def folder_extensions() -> dict[str, Callable[[Any, Path], Any]]:
    """Files beside a saved dense model that rebuild extra structure on it after loading:
    file name -> fn(model, folder)."""
    from qingzhou.llm.moe import SPEC_FILE, apply_moefication

    return {SPEC_FILE: apply_moefication}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class ModelSource:
    """A resolved model location. kind: 'folder' | 'gguf' | 'hub' | 'adapter' (a peft folder)."""

    kind: str
    path: str
    requested: str
    weights: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        return str(Path(self.path).parent) if self.kind == "gguf" else self.path

    @property
    def gguf_file(self) -> str | None:
        return Path(self.path).name if self.kind == "gguf" else None

    def hashes(self) -> dict[str, str]:
        """A cheap fingerprint of the weights for run.json: sha256 of a GGUF file (tens of MB),
        name+size+mtime of a folder's weight files (hashing GBs of shards would dominate a run)."""
        from qingzhou.io import sha256_file, sha256_text

        if self.kind == "gguf":
            return {self.path: sha256_file(self.path)}
        if self.kind in ("folder", "adapter"):
            stats = [f"{w}:{Path(w).stat().st_size}:{int(Path(w).stat().st_mtime)}" for w in self.weights]
            return {self.path: "stat:" + sha256_text("\n".join(stats))}
        return {self.path: "hub"}


def resolve_source(source: str, *, allow_pickle: bool = False) -> ModelSource:
    """Work out what `source` names, and check the files are there and safe, before loading."""
    requested = str(source)
    aliased = resolve_alias(requested)
    if aliased is not None:
        source = aliased
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}", where=requested)
        return ModelSource("gguf", str(path.resolve()), requested, [str(path.resolve())])
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return check_adapter(path.resolve(), requested, allow_pickle)
    if path.is_dir():
        return _check_folder(path.resolve(), requested, allow_pickle)
    if path.exists():
        raise ModelLoadError(f"'{path}' is a file but not a .gguf model.", where=requested,
                             hint="Pass a model folder, a .gguf file, a hub id or an alias.")
    if is_hub_id(str(source)):
        return ModelSource("hub", str(source), requested)
    raise ModelLoadError(
        f"no model found at '{requested}' (no such file or folder).",
        hint=f"Expected a local folder with config.json and *.safetensors, a .gguf file, a hub id like 'org/name', or an alias ({', '.join(ALIASES)}).",
    )


def recorded_source(source: str) -> str:
    """What to write where another program must find this model again (an adapter's
    `base_model_name_or_path`): an alias resolved to what it names (a hub id, or the .gguf file
    or folder it points at), a local path made absolute, a hub id as given. Only qingzhou knows
    its aliases; peft would send `smollm2` to the hub."""
    target = resolve_alias(str(source)) or str(source)
    path = Path(target).expanduser()
    return str(path.resolve()) if path.exists() else target


def check_adapter(path: Path, requested: str, allow_pickle: bool = False) -> ModelSource:
    """A peft adapter folder: its weights must be safetensors unless pickle is allowed."""
    path = Path(path)
    safetensors = sorted(str(p) for p in path.glob("adapter_model*.safetensors"))
    pickles = sorted(str(p) for p in path.glob("adapter_model*") if p.suffix in PICKLE_SUFFIXES)
    return _weights_source("adapter", path, requested, safetensors, pickles, allow_pickle,
                           pickled=f"the adapter in {path} is saved only as pickle",
                           fix="Re-save it with safe_serialization=True",
                           missing=f"the adapter folder {path} has no weights (adapter_model.safetensors).")


def _check_folder(path: Path, requested: str, allow_pickle: bool) -> ModelSource:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json.", where=requested, hint="Expected a Hugging Face model folder (save_pretrained output).")
    safetensors = sorted(str(p) for p in path.glob("*.safetensors"))
    pickles = sorted(str(p) for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and ("model" in p.name or "pytorch" in p.name))
    return _weights_source("folder", path, requested, safetensors, pickles, allow_pickle,
                           pickled=f"{path} holds only pickle weights", fix="Convert them to safetensors",
                           missing=f"{path} has a config.json but no weight files (*.safetensors).")


def _weights_source(kind: str, path: Path, requested: str, safetensors: list[str], pickles: list[str],
                    allow_pickle: bool, *, pickled: str, fix: str, missing: str) -> ModelSource:
    """The weights of a folder: safetensors, or pickle files only when the caller allows them
    (they can run arbitrary code when loaded); none at all is an error too."""
    if not safetensors and pickles and not allow_pickle:
        raise ModelLoadError(
            f"{pickled} ({', '.join(Path(p).name for p in pickles)}), which can run arbitrary code when loaded.",
            where=requested, hint=f"{fix}, or pass --allow-pickle (allow_pickle=True) if you trust the source.")
    if not safetensors and not pickles:
        raise ModelLoadError(missing, where=requested)
    return ModelSource(kind, str(path), requested, safetensors or pickles)


def _check_remote_code(config: dict[str, Any], requested: str, trust_remote_code: bool) -> None:
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            "this model's config asks for custom Python code from its repository (auto_map), which qingzhou does not run by default.",
            where=requested,
            hint="Pass --trust-remote-code (trust_remote_code=True) only if you trust its author.",
        )


def load_model(
    source: str = "smollm2",
    dtype: str = "auto",
    device: str = "auto",
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    strict: bool = True,
    device_map: Any = None,
    max_memory: Any = None,
    offload_folder: str | None = None,
):
    """Load `(model, tokenizer)` ready for inference on `device` in `dtype`.

    `source`: a registry alias (see `qingzhou.llm.ALIASES`), a local Hugging Face folder, a
    `.gguf` file (dequantised by transformers' GGUF support) or a hub id. A GGUF-loaded model has its
    GGUF quantizer state dropped, so it behaves (and saves) as a plain dense model.

    `strict` (default): tensors the architecture needs but the checkpoint lacks, tensors it has
    but the architecture does not use, and tensors of the wrong shape raise ModelLoadError naming
    them (keys the model class declares ignorable, and tied weights, are not counted). With
    `strict=False` such a model loads with those tensors freshly initialised, as transformers does
    (and transformers' load report says which). GPTQ-layout folders are always loaded strictly.

    Big models (`llm/bigload.py`): with `max_memory` ("6GiB" for the compute device, or
    "cuda:0=6GiB,cpu=12GiB", or accelerate's dict) or `device_map` the model is built on the meta
    device and placed layer by layer from the memory-mapped safetensors shards; the layers that do
    not fit stay on disk and stream in during the forward (`llm/offload.py`). A budget smaller than
    the largest layer is a BudgetError naming it. There `dtype="auto"` is the checkpoint's own dtype
    (casting a bf16 checkpoint to float32 on the CPU would double what streams). A GGUF source is
    converted once to a safetensors cache (`gguf_cache`) and loaded the same way; GPTQ-layout
    folders always load this way (packed layers, never a dense copy). `offload_folder` is accepted
    for accelerate's API; safetensors shards are read in place, so nothing is written there.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qingzhou.llm.devices import keep_bnb_4bit_layout, resolve_device, resolve_dtype

    src = resolve_source(source, allow_pickle=allow_pickle)
    if (max_memory or device_map) and src.kind in ("folder", "gguf"):
        return _load_big(src, dtype, device, strict=strict, trust_remote_code=trust_remote_code,
                         device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if src.kind == "adapter":
        return _load_adapter(src, dtype, device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, strict=strict)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if src.kind == "gguf":
        common["gguf_file"] = src.gguf_file
    if revision:
        common["revision"] = revision
    config: dict[str, Any] = {}
    try:
        if src.kind == "folder":
            config = json.loads((Path(src.path) / "config.json").read_text())
            _check_remote_code(config, source, trust_remote_code)
        elif src.kind == "hub":
            _check_remote_code(AutoConfig.from_pretrained(src.path, trust_remote_code=False, **({"revision": revision} if revision else {})).to_dict(), source, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(src.folder, **common)
        quant_method = (config.get("quantization_config") or {}).get("quant_method")
        if quant_method in quantized_loaders():
            model = quantized_loaders()[quant_method](src.path, dtype=torch_dtype, device=dev)
        else:
            with _quiet_load_report(strict):
                model, info = AutoModelForCausalLM.from_pretrained(
                    src.folder, dtype=torch_dtype, use_safetensors=None if (allow_pickle or src.kind == "gguf") else True,
                    output_loading_info=True, ignore_mismatched_sizes=True, **common
                )
            if strict:
                check_loading_info(model, info, where=f"{source} ({src.path})")
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # corrupt/missing files, bad config
        raise ModelLoadError(f"could not load the model: {_first_line(e)}", where=f"{source} ({src.path})") from e
    if src.kind == "gguf":
        drop_quantizer_state(model)
        record_gguf_tokenizer(tokenizer, src.path)  # llama.cpp's pre-tokenizer name, for a GGUF export
    if src.kind == "folder":
        model = _apply_folder_extensions(model, Path(src.path))
    keep_bnb_4bit_layout(model)  # a bitsandbytes-quantised folder: see the device layer
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev)
    model.eval()
    model.qingzhou_source = src.path  # where it came from, for reports
    return model, tokenizer


def _load_big(src: ModelSource, dtype: str, device: str, *, strict: bool, trust_remote_code: bool,
              device_map: Any, max_memory: Any, offload_folder: str | None):
    """`load_model` with a memory budget: meta build + placement + streaming (llm/bigload.py)."""
    from transformers import AutoTokenizer

    from qingzhou.llm.bigload import load_big, read_config
    from qingzhou.llm.devices import resolve_device, resolve_dtype

    dev = resolve_device(device)
    folder = Path(src.path)
    tokenizer_from: str = str(folder)
    if src.kind == "gguf":
        from qingzhou.llm.gguf_cache import gguf_to_safetensors

        folder = gguf_to_safetensors(src.path)
    config = read_config(folder)
    _check_remote_code(config, src.requested, trust_remote_code)
    if dtype in (None, "auto") and config.get("torch_dtype", config.get("dtype")) in ("bfloat16", "float16", "float32"):
        from qingzhou.errors import DeviceError

        try:
            torch_dtype = resolve_dtype(config.get("torch_dtype", config.get("dtype")), dev)
        except DeviceError:  # e.g. a float16 checkpoint on the CPU
            torch_dtype = resolve_dtype("auto", dev)
    else:
        torch_dtype = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder) if src.kind == "gguf" else tokenizer_from)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"the model folder has no usable tokenizer: {_first_line(e)}", where=str(folder)) from None
    big = {"max_memory": max_memory, "device_map": None if device_map in (None, "auto") else device_map,
           "offload_folder": offload_folder}
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    if quant_method in quantized_loaders():
        model = quantized_loaders()[quant_method](str(folder), dtype=torch_dtype, device=dev, **big)
    else:
        model = load_big(folder, dtype=torch_dtype, device=dev, strict=strict, **big)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.qingzhou_source = src.path
    return model, tokenizer


def check_loading_info(model: Any, info: dict[str, Any], where: str) -> None:
    """Raise ModelLoadError when a checkpoint does not fill the architecture exactly.

    `info` is transformers' `output_loading_info`: missing, unexpected and mismatched keys. Keys
    matching the model class's `_keys_to_ignore_on_load_*` patterns and tied weights (filled from
    the tensor they are tied to) are not problems.
    """
    import re

    def ignorable(keys: Any, patterns: Any) -> list[str]:
        regexes = [re.compile(p) for p in (patterns or ())]
        return sorted(k for k in keys if not any(r.search(k) for r in regexes))

    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) | set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in ignorable(info.get("missing_keys", ()), getattr(model, "_keys_to_ignore_on_load_missing", None)) if k not in tied]
    unexpected = ignorable(info.get("unexpected_keys", ()), getattr(model, "_keys_to_ignore_on_load_unexpected", None))
    mismatched = sorted(info.get("mismatched_keys", ()), key=lambda m: m[0])
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the architecture needs are missing from the checkpoint ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the checkpoint are not used by the architecture ({_names(unexpected)})")
    if mismatched:
        shapes = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
        problems.append(f"{len(mismatched)} tensor(s) have the wrong shape ({_names(shapes)})")
    raise ModelLoadError(
        "the weights do not match the architecture in config.json: " + "; ".join(problems) + ".",
        where=where,
        hint="Check that config.json belongs to these weights (layers, sizes). Pass --no-strict (strict=False, "
             "`strict: false` in a load stage) to load anyway with those tensors freshly initialised.",
    )


def _names(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


@contextlib.contextmanager
def _quiet_load_report(strict: bool):
    """Drop transformers' load-report warning while loading strictly: check_loading_info turns the
    same facts into one error paragraph, and the table would print before it. (A filter, not a
    level: transformers runs extra checks when its logger's level is raised.)"""
    import logging

    logger = logging.getLogger("transformers.modeling_utils")

    def no_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    if strict:
        logger.addFilter(no_report)
    try:
        yield
    finally:
        logger.removeFilter(no_report)


def _apply_folder_extensions(model: Any, folder: Path) -> Any:
    for name, apply in folder_extensions().items():
        if (folder / name).is_file():
            model = apply(model, folder)
    return model


def _load_adapter(src: ModelSource, dtype: str, device: str, **kw):
    """A peft adapter folder: load its base (recorded in adapter_config.json), then the adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    try:
        cfg = json.loads((Path(src.path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"adapter_config.json cannot be read: {_first_line(e)}", where=src.path) from None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError("adapter_config.json does not say which base model it adapts (base_model_name_or_path).", where=src.path)
    if not src.weights:
        raise ModelLoadError("adapter folder has no adapter_model.safetensors.", where=src.path)
    model, tokenizer = load_model(base, dtype, device, **kw)
    model = PeftModel.from_pretrained(model, src.path, is_trainable=False)
    if any(Path(src.path).glob("tokenizer*.json")):
        tokenizer = AutoTokenizer.from_pretrained(src.path)
    model.eval()
    return model, tokenizer


def drop_quantizer_state(model) -> None:
    """Forget the GGUF 'quantization' transformers records on a GGUF-loaded model.

    The weights are already dequantised to dense tensors; the leftover quantizer only makes
    `save_pretrained` write a config that claims GGUF quantization and breaks reloading.
    """
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        try:
            model.quantization_method = None
        except AttributeError:
            pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def describe_model(model) -> dict[str, Any]:
    """Size and shape facts for reports: parameters, bytes in memory, architecture, dtype, device."""
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    p0 = next(model.parameters())
    cfg = model.config
    return {
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(cfg, "model_type", None),
        "parameters": params,
        "memory_bytes": nbytes,
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "dtype": str(p0.dtype).replace("torch.", ""),
        "device": str(p0.device),
    }


def model_size(model, source: str | None = None) -> dict[str, Any]:
    """Parameters, bytes in memory and, for a local source, bytes on disk of the weight files."""
    info = describe_model(model)
    out = {"parameters": info["parameters"], "memory_mb": round(info["memory_bytes"] / 2**20, 2), "disk_mb": None}
    if source:
        path = Path(resolve_alias(source) or source)
        files = [path] if path.is_file() else [*path.glob("*.safetensors"), *path.glob("*.gguf")] if path.is_dir() else []
        if files:
            out["disk_mb"] = round(sum(f.stat().st_size for f in files) / 2**20, 2)
    return out
