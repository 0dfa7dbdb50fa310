"""The quantizer table: method name -> `fn(model, cfg, plan, calib) -> dict`, its config class and
whether it needs calibration data. Filled by one decorator line in each method's file; the method
files are torch-free at import so configs validate instantly."""
from __future__ import annotations

from typing import Any

from qingzhou.compress.quantize.config import QuantizeConfig
from qingzhou.registry import Registry

QUANTIZERS: Registry[Any] = Registry(
    "quantization method",
    modules=[f"qingzhou.compress.quantize.{m}" for m in ("rtn", "gptq", "awq", "smoothquant", "bnb")],
)


def register_quantizer(name: str, config: type[QuantizeConfig], *, needs_calibration: bool = True):
    """Decorator: register `fn(model, cfg, plan, calib) -> dict` as quantizer `name`."""
    return QUANTIZERS.register(name, config, needs_calibration=needs_calibration)


def parse_config(data: dict[str, Any] | QuantizeConfig) -> QuantizeConfig:
    """Validate a plain dict (from YAML/CLI) into the config of its `method` (typed configs pass)."""
    return QUANTIZERS.validate(data)
