"""Compression: quantization (`compress.quantize`), and the shared layer-by-layer calibration
engine (`compress.calibrate`) that pruning methods reuse. Names resolve lazily (no torch at import)."""
from __future__ import annotations

from typing import Any

_LAZY = {
    "quantize": "qingzhou.compress.quantize.api",
    "save_quantized": "qingzhou.compress.quantize.formats.gptq_layout",
    "load_quantized": "qingzhou.compress.quantize.formats.gptq_layout",
    "run_layerwise": "qingzhou.compress.calibrate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
