"""Load a causal LM and its tokenizer from an alias, a local folder, a .gguf file or a hub id.

Safety defaults: pickle weights (`.bin`, `.pt`) are refused and `trust_remote_code` is off unless
the caller asks, since both run arbitrary code from the model's author.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qingzhou.errors import ModelLoadError
from qingzhou.llm.aliases import ALIASES, resolve_alias


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
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


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
        return ModelSource("adapter", str(path.resolve()), requested, sorted(str(p) for p in path.glob("adapter_model.safetensors")))
    if path.is_dir():
        return _check_folder(path.resolve(), requested, allow_pickle)
    if path.exists():
        raise ModelLoadError(f"'{path}' is a file but not a .gguf model.", hint="Pass a model folder, a .gguf file, a hub id or an alias.")
    if HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        return ModelSource("hub", str(source), requested)
    raise ModelLoadError(
        f"no model found at '{requested}'.",
        hint=f"Expected a local folder with config.json and *.safetensors, a .gguf file, a hub id like 'org/name', or an alias ({', '.join(ALIASES)}).",
    )


def _check_folder(path: Path, requested: str, allow_pickle: bool) -> ModelSource:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json.", where=requested, hint="Expected a Hugging Face model folder (save_pretrained output).")
    safetensors = sorted(str(p) for p in path.glob("*.safetensors"))
    pickles = sorted(str(p) for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and ("model" in p.name or "pytorch" in p.name))
    if not safetensors and pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickle weights ({', '.join(Path(p).name for p in pickles)}), which can run arbitrary code when loaded.",
            where=requested,
            hint="Convert them to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the source.",
        )
    if not safetensors and not pickles:
        raise ModelLoadError(f"{path} has a config.json but no weight files (*.safetensors).", where=requested)
    return ModelSource("folder", str(path), requested, safetensors or pickles)


def _check_remote_code(config: dict[str, Any], requested: str, trust_remote_code: bool) -> None:
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            "this model's config asks for custom Python code from its repository (auto_map), which qingzhou does not run by default.",
            where=requested,
            hint="Pass trust_remote_code=True (--trust-remote-code) only if you trust its author.",
        )


def load_model(
    source: str = "smollm2",
    dtype: str = "auto",
    device: str = "auto",
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
):
    """Load `(model, tokenizer)` ready for inference on `device` in `dtype`.

    `source`: a registry alias (see `qingzhou.llm.ALIASES`), a local Hugging Face folder, a
    `.gguf` file (dequantised by transformers' GGUF support) or a hub id. A GGUF-loaded model has its
    GGUF quantizer state dropped, so it behaves (and saves) as a plain dense model.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qingzhou.llm.devices import keep_bnb_4bit_layout, resolve_device, resolve_dtype

    src = resolve_source(source, allow_pickle=allow_pickle)
    if src.kind == "adapter":
        return _load_adapter(src, dtype, device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
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
            model = AutoModelForCausalLM.from_pretrained(
                src.folder, dtype=torch_dtype, use_safetensors=None if (allow_pickle or src.kind == "gguf") else True, **common
            )
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # corrupt/missing files, bad config
        raise ModelLoadError(f"could not load the model: {_first_line(e)}", where=f"{source} ({src.path})") from e
    if src.kind == "gguf":
        drop_quantizer_state(model)
    if src.kind == "folder":
        model = _apply_folder_extensions(model, Path(src.path))
    keep_bnb_4bit_layout(model)  # a bitsandbytes-quantised folder: see the device layer
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev)
    model.eval()
    model.qingzhou_source = src.path  # where it came from, for reports
    return model, tokenizer


def _apply_folder_extensions(model: Any, folder: Path) -> Any:
    for name, apply in folder_extensions().items():
        if (folder / name).is_file():
            model = apply(model, folder)
    return model


def _load_adapter(src: ModelSource, dtype: str, device: str, **kw):
    """A peft adapter folder: load its base (recorded in adapter_config.json), then the adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    cfg = json.loads((Path(src.path) / "adapter_config.json").read_text())
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
