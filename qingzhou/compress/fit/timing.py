"""The speed cost of each option: batch-1 forward time of its layer, measured on the target device.

A speed budget ("at least 40 tokens/s on this card") cannot be met from a formula: on CPU a
2-bit layer that dequantises every call is slower than a dense one, on CUDA the int4 kernel is
faster, and the ratios move with the shape. So every (shape, option) the plan may use is timed
once: `QuantLinear` (or `nn.Linear` for keep) on a [1, 1, in] input in the model's dtype, the
median of `repeats` calls after a warm-up, which is what one decode step asks of it. Decode time
per token is predicted as the sum over the fitted linears of their option's time plus the rest of
the model (embeddings, norms, attention, lm_head), measured once as one real decode step of the
dense model minus its dense linears' times.

The table is cached as JSON (`fit_timing.json` in `cache_dir`), keyed by device (name, and CPU
thread count), torch version, dtype, shape and option, so a second fit on the same machine times
nothing it has timed before; the rest-of-model step is re-measured per model (one step, cheap).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qingzhou.compress.fit.storage import Option

CACHE_FILE = "fit_timing.json"


def default_cache_dir() -> Path:
    """$QINGZHOU_CACHE/fit, else ~/.cache/qingzhou/fit."""
    root = os.environ.get("QINGZHOU_CACHE") or Path.home() / ".cache" / "qingzhou"
    return Path(root) / "fit"


def device_label(device: torch.device) -> str:
    """What the timings depend on besides shape and option: the device model (and CPU threads)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{platform.machine()}:{platform.processor() or 'cpu'}:{torch.get_num_threads()}threads"
    return device.type


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_call(fn: Callable[[], Any], device: torch.device, *, repeats: int = 30, warmup: int = 5) -> float:
    """Median seconds of `fn()` on `device` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def time_option(in_features: int, out_features: int, option: Option, *, bias: bool, dtype: torch.dtype,
                device: torch.device, repeats: int = 30) -> float:
    """Batch-1, one-token forward seconds of one layer of this shape under `option`."""
    from qingzhou.llm.quantized.grid import QuantScheme, rtn_quantize_weight
    from qingzhou.llm.quantized.qlinear import QuantLinear

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    if option.keep:
        layer: nn.Module = nn.Linear(in_features, out_features, bias=bias)
        layer.weight.data.copy_(w)
        if b is not None:
            layer.bias.data.copy_(b)
        layer = layer.to(device, dtype)
    else:
        scheme = QuantScheme(bits=int(option.bits), group_size=option.group_size)  # type: ignore[arg-type]
        layer = QuantLinear.from_quantized(rtn_quantize_weight(w, scheme), b).to(device)
    x = torch.randn(1, 1, in_features, generator=gen).to(device, dtype)
    return time_call(lambda: layer(x), device, repeats=repeats)


class TimingTable:
    """Seconds per (shape, option) on one device, measured on demand and cached on disk."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cache_dir: str | Path | None = None,
                 *, repeats: int = 30) -> None:
        self.device, self.dtype, self.repeats = device, dtype, repeats
        self.path = Path(cache_dir or default_cache_dir()) / CACHE_FILE
        self.prefix = f"{device_label(device)}|torch {torch.__version__}|{str(dtype).removeprefix('torch.')}"
        self.cache: dict[str, float] = {}
        if self.path.exists():
            try:
                self.cache = {k: float(v) for k, v in json.loads(self.path.read_text(encoding="utf-8")).items()}
            except (ValueError, AttributeError):  # a damaged cache is re-measured, never trusted
                self.cache = {}
        self.measured = 0

    def key(self, in_features: int, out_features: int, option: Option, bias: bool) -> str:
        return f"{self.prefix}|{in_features}x{out_features}|bias={int(bias)}|{option.label}"

    def seconds(self, in_features: int, out_features: int, option: Option, bias: bool) -> float:
        k = self.key(in_features, out_features, option, bias)
        if k not in self.cache:
            self.cache[k] = time_option(in_features, out_features, option, bias=bias, dtype=self.dtype,
                                        device=self.device, repeats=self.repeats)
            self.measured += 1
        return self.cache[k]

    def save(self) -> None:
        from qingzhou.io import atomic_write_json

        if self.measured:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {}
            if self.path.exists():  # another fit may have added entries meanwhile
                try:
                    merged = json.loads(self.path.read_text(encoding="utf-8"))
                except ValueError:
                    merged = {}
            atomic_write_json(self.path, {**merged, **self.cache})


@torch.no_grad()
def decode_step_seconds(model: nn.Module, device: torch.device, *, context: int = 32, repeats: int = 20) -> float:
    """Median seconds of one batch-1 decode step of `model` (on `device`) after a `context`-token
    prompt, with a static KV cache as `llm.generate` decodes (sized for every timed step, so each
    attends over about the same `context` tokens)."""
    from transformers import StaticCache

    from qingzhou.llm.forward_args import cache_argument

    arg = cache_argument(model)
    vocab = max(2, int(getattr(model.config, "vocab_size", 2)))
    ids = (torch.arange(1, context + 1, device=device) % (vocab - 1))[None]
    extra: dict[str, Any] = {}
    if arg is not None:
        extra[arg] = StaticCache(config=model.config, max_cache_len=context + repeats + 8)
    model(input_ids=ids, cache_position=torch.arange(context, device=device), use_cache=arg is not None, **extra)
    nxt, pos = ids[:, -1:], torch.tensor([context], device=device)

    def step() -> None:
        model(input_ids=nxt, cache_position=pos, use_cache=arg is not None, **extra)
        pos.add_(1)

    return time_call(step, device, repeats=repeats, warmup=3)


def speed_table(model: nn.Module, linears: Mapping[str, nn.Linear], options: Mapping[str, Iterable[Option]],
                device: torch.device, cache_dir: str | Path | None = None) -> tuple[dict[str, dict[Option, float]], float]:
    """({linear: {option: seconds}}, rest-of-model seconds per decode step) on `device`.

    `model` is moved to `device` for the decode-step measurement and back to where it was."""
    from qingzhou.compress.calibrate import _module_device

    dtype = next(iter(linears.values())).weight.dtype
    table = TimingTable(device, dtype, cache_dir)
    out: dict[str, dict[Option, float]] = {}
    for name, lin in linears.items():
        bias = lin.bias is not None
        out[name] = {o: table.seconds(lin.in_features, lin.out_features, o, bias) for o in options[name]}
    table.save()
    home = _module_device(model)
    model.to(device)
    try:
        step = decode_step_seconds(model, device)
    finally:
        if home is not None:
            model.to(home)
    dense = sum(out[n][Option()] if Option() in out[n] else table.seconds(
        linears[n].in_features, linears[n].out_features, Option(), linears[n].bias is not None) for n in linears)
    return out, max(step - dense, 0.0)
