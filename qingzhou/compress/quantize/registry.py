"""Quantizer registry: method name -> (config model, function). Filled by one decorator line in
each method's file; the method files are torch-free at import so configs validate instantly."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qingzhou.compress.quantize.config import QuantizeConfig

# One line per method file (these modules import torch only inside their functions).
_METHOD_MODULES = ("rtn", "gptq", "awq", "smoothquant", "bnb")


@dataclass(frozen=True)
class QuantizerSpec:
    name: str
    config: type[QuantizeConfig]
    run: Callable[..., Any]
    needs_calibration: bool


QUANTIZERS: dict[str, QuantizerSpec] = {}


def register_quantizer(name: str, config: type[QuantizeConfig], *, needs_calibration: bool = True):
    """Decorator: register `fn(model, cfg, plan, calib) -> MethodResult` as quantizer `name`."""

    def decorate(fn):
        if name in QUANTIZERS and QUANTIZERS[name].run is not fn:
            raise RuntimeError(f"quantizer {name!r} registered twice")
        QUANTIZERS[name] = QuantizerSpec(name, config, fn, needs_calibration)
        return fn

    return decorate


def load_quantizers() -> dict[str, QuantizerSpec]:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"qingzhou.compress.quantize.{mod}")
    return QUANTIZERS


def parse_config(data: dict[str, Any] | QuantizeConfig) -> QuantizeConfig:
    """Validate a plain dict (from YAML/CLI) into the config of its `method`."""
    from qingzhou.recipes.registry import validate_method_config

    if isinstance(data, QuantizeConfig):
        return data
    return validate_method_config(data, load_quantizers(), "quantization")
