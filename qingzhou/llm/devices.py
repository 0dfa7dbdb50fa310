"""The device layer: which accelerator to use, and what it can do.

Detection goes through accelerate's `is_*_available` helpers, so Ascend (npu), Cambricon (mlu),
Intel (xpu), Moore Threads (musa), Apple (mps) and CUDA-compatible devices (NVIDIA, Hygon DCU via
ROCm) are found the same way accelerate finds them for training. The capability table decides the
default dtype and turns unsupported combinations (bf16 on a device without it, bitsandbytes on an
NPU) into a clear `DeviceError` before any work starts.
"""
from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import asdict, dataclass, replace
from typing import Any

from qingzhou.errors import DeviceError, did_you_mean


@dataclass(frozen=True)
class Capabilities:
    """What a device type supports. `bf16`/`fp16`: usable as model dtypes. `bitsandbytes`: the
    bnb kernels run there (4-bit/8-bit loading, 8-bit optimizers). `flash_attention`: the
    flash-attn package's kernels (`attn_implementation="flash_attention_2"`)."""

    bf16: bool
    fp16: bool
    bitsandbytes: bool
    flash_attention: bool
    vendor: str


# Static table: what each device type supports at best. `capabilities()` refines it at run time
# (a pre-Ampere CUDA GPU has no bf16, flash-attn must be installed, ...).
CAPABILITIES: dict[str, Capabilities] = {
    "cuda": Capabilities(bf16=True, fp16=True, bitsandbytes=True, flash_attention=True, vendor="NVIDIA / CUDA-compatible (Hygon DCU via ROCm)"),
    "npu": Capabilities(bf16=True, fp16=True, bitsandbytes=False, flash_attention=False, vendor="Huawei Ascend (torch_npu)"),
    "mlu": Capabilities(bf16=True, fp16=True, bitsandbytes=False, flash_attention=False, vendor="Cambricon (torch_mlu)"),
    "musa": Capabilities(bf16=True, fp16=True, bitsandbytes=False, flash_attention=False, vendor="Moore Threads (torch_musa)"),
    "xpu": Capabilities(bf16=True, fp16=True, bitsandbytes=False, flash_attention=False, vendor="Intel XPU"),
    "mps": Capabilities(bf16=False, fp16=True, bitsandbytes=False, flash_attention=False, vendor="Apple Metal"),
    "cpu": Capabilities(bf16=True, fp16=False, bitsandbytes=True, flash_attention=False, vendor="CPU"),
}
# bitsandbytes before the multi-backend release (0.46) has CUDA kernels only; from 0.46 its CPU
# backend runs NF4/FP4 `Linear4bit`, int8 `Linear8bitLt` and the 8-bit optimizers.
BNB_MIN_VERSION = {"cpu": (0, 46)}

# Detection order: the first available wins for `device="auto"`.
DETECTION_ORDER = ("cuda", "npu", "mlu", "musa", "xpu", "mps", "cpu")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}


def is_available(device_type: str) -> bool:
    """Whether a device type is usable here, asked the way accelerate asks."""
    import accelerate.utils as au
    import torch

    checks = {
        "cuda": torch.cuda.is_available,
        "npu": au.is_npu_available,
        "mlu": au.is_mlu_available,
        "musa": au.is_musa_available,
        "xpu": au.is_xpu_available,
        "mps": au.is_mps_available,
        "cpu": lambda: True,
    }
    return bool(checks[device_type]())


def available_devices() -> list[str]:
    return [d for d in DETECTION_ORDER if is_available(d)]


def resolve_device(requested: str = "auto") -> str:
    """Turn 'auto' / 'cuda:1' / 'npu' into a concrete torch device string, or raise DeviceError."""
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return next(d for d in DETECTION_ORDER if is_available(d))
    dtype_part, _, index = requested.partition(":")
    if dtype_part not in CAPABILITIES:
        raise DeviceError(f"unknown device '{requested}'.", hint=did_you_mean(dtype_part, [*CAPABILITIES, "auto"]))
    if index and not index.isdigit():
        raise DeviceError(f"bad device index in '{requested}': expected e.g. '{dtype_part}:0'.")
    if not is_available(dtype_part):
        raise DeviceError(
            f"device '{requested}' was requested but is not available on this machine.",
            hint=f"Available here: {', '.join(available_devices())}. Use device: auto to pick the best one.",
        )
    return requested


def torch_device(requested: Any = None) -> Any:
    """`resolve_device` as a `torch.device`; None or 'auto' picks the best available one.

    Accepts what callers hold: None, a config string ('auto', 'cuda:1', 'npu') or a torch.device.
    A device that is not available here raises the same `DeviceError` as `resolve_device`.
    """
    import torch

    return torch.device(resolve_device("auto" if requested is None else str(requested)))


def capabilities(device: str) -> Capabilities:
    """The capability row for a device string, refined by what this machine really has."""
    device_type = device.split(":")[0]
    caps = CAPABILITIES[device_type]
    if device_type == "cuda" and is_available("cuda"):
        import torch

        has_bf16 = torch.cuda.is_bf16_supported()
        has_flash = importlib.util.find_spec("flash_attn") is not None and torch.version.hip is None
        caps = replace(caps, bf16=has_bf16, flash_attention=has_flash and torch.cuda.get_device_capability()[0] >= 8)
    if caps.bitsandbytes and not _bnb_version_ok(device_type):
        caps = replace(caps, bitsandbytes=False)
    return caps


def bitsandbytes_version() -> tuple[int, ...] | None:
    """The installed bitsandbytes version (from package metadata: importing it is slow), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("bitsandbytes")
    except PackageNotFoundError:
        return None
    return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())


def _bnb_version_ok(device_type: str) -> bool:
    installed = bitsandbytes_version()
    return installed is not None and installed >= BNB_MIN_VERSION.get(device_type, (0,))


def keep_bnb_4bit_layout(model: Any) -> Any:
    """Turn off bitsandbytes' CPU repacking on every 4-bit layer of `model`; returns `model`.

    From 0.49 on a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode under no_grad rewrites
    its own weight, in place, into a layout for a bf16 kernel: from then on the layer computes in
    bf16 whatever its compute dtype, has no backward (a later training step fails inside
    `matmul_4bit` with "a view of a leaf Variable ... in-place", or its gradients stop there),
    and saving converts back through bf16 block scales, so a saved model no longer reproduces
    its own logits. Keeping the reference layout (the per-layer flag bitsandbytes itself reads)
    makes 4-bit layers compute in their compute dtype, train after evaluation and round-trip
    exactly. Layers of older releases lack the flag and need nothing."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def resolve_dtype(dtype: str, device: str):
    """'auto' picks bf16, then fp16, on accelerators and float32 on CPU (CPU half math is slow
    and loses accuracy); an explicit dtype the device cannot run raises DeviceError."""
    import torch

    dtype = (dtype or "auto").strip().lower()
    caps = capabilities(device)
    if dtype == "auto":
        if device.startswith("cpu"):
            return torch.float32
        return torch.bfloat16 if caps.bf16 else torch.float16 if caps.fp16 else torch.float32
    if dtype not in DTYPES:
        raise DeviceError(f"unknown dtype '{dtype}'.", hint=did_you_mean(dtype, [*DTYPES, "auto"]))
    name = DTYPES[dtype]
    if name == "bfloat16" and not caps.bf16:
        raise DeviceError(f"dtype bfloat16 is not supported on device '{device}'.", hint="Use float16 or float32.")
    if name == "float16" and not caps.fp16:
        raise DeviceError(f"dtype float16 is not supported on device '{device}'.", hint="Use bfloat16 or float32.")
    return getattr(torch, name)


def require(feature: str, device: str) -> None:
    """Raise DeviceError unless `feature` (a Capabilities field) is supported on `device`."""
    caps = capabilities(device)
    if not hasattr(caps, feature):
        raise ValueError(f"unknown capability {feature!r}")
    if not getattr(caps, feature):
        supported = [d for d, c in CAPABILITIES.items() if getattr(c, feature)]
        hint = f"Supported on: {', '.join(supported)}." if supported else ""
        if feature == "bitsandbytes":
            hint += _bnb_install_hint(device.split(":")[0])
        raise DeviceError(f"{feature.replace('_', ' ')} is not supported on device '{device}'.", hint=hint.strip())


def import_bitsandbytes() -> Any:
    """`import bitsandbytes`, without the deprecation warnings its first import emits (they would
    otherwise land in the first quantize report's warnings)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes
    return bitsandbytes


def bitsandbytes_device(device: str = "auto") -> str:
    """The concrete device bitsandbytes will run on (`auto`: the first accelerator it supports,
    else the CPU); `DeviceError` unless it is installed and usable there."""
    if device == "auto":
        device = "cuda" if is_available("cuda") else "cpu"
    device = resolve_device(device)
    require("bitsandbytes", device)
    return device


def require_bitsandbytes(feature: str, device: str = "auto") -> Any:
    """The bitsandbytes module, or a `DeviceError` naming `feature` when it cannot run on `device`
    (for training: where the loop will run, CUDA if present, else CPU)."""
    try:
        bitsandbytes_device(device)
    except DeviceError as e:
        raise DeviceError(f"{feature} needs bitsandbytes: {e.message}", hint=e.hint) from None
    return import_bitsandbytes()


def _bnb_install_hint(device_type: str) -> str:
    installed = bitsandbytes_version()
    if installed is None:
        return " bitsandbytes is not installed (pip install 'qingzhou[bnb]')."
    needed = BNB_MIN_VERSION.get(device_type)
    if needed and installed < needed and CAPABILITIES[device_type].bitsandbytes:
        have, want = ".".join(map(str, installed)), ".".join(map(str, needed))
        return f" bitsandbytes {have} is installed; on {device_type} it needs >= {want} (pip install -U bitsandbytes)."
    return ""


def memory_info(device: str) -> dict[str, float | None]:
    """Total and free memory of a device, in GiB (host RAM for the CPU)."""
    import torch

    gib = 1024**3
    device_type = device.split(":")[0]
    module = getattr(torch, device_type, None)
    if device_type != "cpu" and module is not None and hasattr(module, "mem_get_info"):
        try:
            free, total = module.mem_get_info()
            return {"total_gib": round(total / gib, 2), "free_gib": round(free / gib, 2)}
        except Exception:  # some backends expose mem_get_info but fail without a context
            pass
    try:
        import psutil

        vm = psutil.virtual_memory()
        return {"total_gib": round(vm.total / gib, 2), "free_gib": round(vm.available / gib, 2)}
    except ImportError:
        return {"total_gib": None, "free_gib": None}


def _memory_backend(device: Any) -> Any:
    """The torch module that tracks allocator statistics for `device` (torch.cuda, torch.npu ...),
    or None where there is none (CPU, MPS): there only the process's peak RSS is known."""
    import torch

    device_type = str(device).split(":")[0]
    module = getattr(torch, device_type, None) if device_type != "cpu" else None
    if module is None or not hasattr(module, "max_memory_allocated"):
        return None
    return module


def _device_args(device: Any) -> tuple[Any, ...]:
    """`(device,)` when it names an index ('cuda:1'), else `()` (the backend's current device)."""
    return (str(device),) if ":" in str(device) else ()


def reset_peak_memory(device: Any) -> None:
    """Start a new peak-memory window on an accelerator. The CPU figure is the process's peak
    resident set size, which cannot be reset: it covers everything since the process started."""
    module = _memory_backend(device)
    if module is not None and hasattr(module, "reset_peak_memory_stats"):
        module.reset_peak_memory_stats(*_device_args(device))


def peak_memory_mb(device: Any) -> float:
    """Peak memory in MiB: the allocator's peak on an accelerator (since `reset_peak_memory`),
    else the process's peak resident set size (see `peak_memory_source`)."""
    module = _memory_backend(device)
    if module is not None:
        return module.max_memory_allocated(*_device_args(device)) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rng_states() -> dict[str, Any]:
    """The random-number states of the CPU and of every accelerator present (`{"cpu": ..., "cuda0":
    ...}`), what a checkpoint saves so a resumed run draws the same numbers."""
    import torch

    states = {"cpu": torch.get_rng_state()}
    for device_type in DETECTION_ORDER:
        module = getattr(torch, device_type, None)
        if device_type != "cpu" and is_available(device_type) and hasattr(module, "get_rng_state_all"):
            states.update({f"{device_type}{i}": s for i, s in enumerate(module.get_rng_state_all())})
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore `rng_states()`; accelerator states apply only where the same number of devices of
    that kind is present (a checkpoint moved to another machine keeps the CPU state)."""
    import torch

    torch.set_rng_state(states["cpu"])
    for device_type in DETECTION_ORDER:
        module = getattr(torch, device_type, None)
        saved = [states[k] for k in sorted(states) if k.startswith(device_type) and k[len(device_type):].isdigit()]
        if device_type != "cpu" and saved and is_available(device_type) and hasattr(module, "set_rng_state_all") \
                and len(saved) == module.device_count():
            module.set_rng_state_all(saved)


def peak_memory_source(device: Any) -> str:
    """What `peak_memory_mb(device)` measures, for reports: e.g. 'cuda max_memory_allocated'."""
    module = _memory_backend(device)
    return f"{str(device).split(':')[0]} max_memory_allocated" if module is not None else "process peak RSS"


def device_name(device: str) -> str:
    import torch

    device_type = device.split(":")[0]
    module = getattr(torch, device_type, None)
    if device_type != "cpu" and module is not None and hasattr(module, "get_device_name"):
        try:
            return str(module.get_device_name())
        except Exception:
            pass
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "datasets", "bitsandbytes", "gguf", "pydantic", "typer")


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("qingzhou", *PACKAGES):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def env_info(device: str = "auto") -> dict[str, Any]:
    """Everything a bug report or a run.json needs about where the work ran."""
    import torch

    resolved = resolve_device(device)
    info: dict[str, Any] = {
        "device": resolved,
        "device_name": device_name(resolved),
        "available_devices": available_devices(),
        "memory": memory_info(resolved),
        "capabilities": asdict(capabilities(resolved)),
        "default_dtype": str(resolve_dtype("auto", resolved)).replace("torch.", ""),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": package_versions(),
    }
    if resolved.startswith("cuda"):
        info["cuda_runtime"] = torch.version.cuda or f"hip {torch.version.hip}"
    return info


# ---------------------------------------------------------------- streams (offloaded inference)
# Device-generic through `torch.get_device_module`: CUDA, NPU, MLU, XPU, MUSA each expose Stream,
# Event, stream() and current_stream(); the CPU (and MPS, single-queue) get None and run in order.


def side_stream(device: Any) -> Any:
    """A second stream on `device` for copies that overlap compute, or None where there is none."""
    import torch

    device = torch.device(device)
    if device.type in ("cpu", "mps", "meta"):
        return None
    module = torch.get_device_module(device.type)
    return module.Stream(device=device) if hasattr(module, "Stream") else None


def stream_context(stream: Any) -> Any:
    """`with stream_context(s):` runs the enclosed device work on `s` (no-op for None)."""
    import contextlib

    import torch

    if stream is None:
        return contextlib.nullcontext()
    return torch.get_device_module(stream.device.type).stream(stream)


def record_event(stream: Any) -> Any:
    """An event marking the work queued on `stream` so far (None for no stream)."""
    if stream is None:
        return None
    return stream.record_event()


def wait_event(device: Any, event: Any) -> None:
    """Make `device`'s current (compute) stream wait for `event` before its next work."""
    import torch

    if event is None:
        return
    torch.get_device_module(torch.device(device).type).current_stream().wait_event(event)


def model_device(model: Any) -> Any:
    """The device a model's inputs go to: the compute device of an offloaded model (whose first
    parameters may be on the meta device between forwards), else that of its first real tensor."""
    import torch

    offload = getattr(model, "qingzhou_offload", None)
    if offload and offload.get("device"):
        return torch.device(offload["device"])
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
