"""Compression: quantization (`compress.quantize`), and the shared layer-by-layer calibration
engine (`compress.calibrate`) that pruning methods reuse. Names resolve lazily (no torch at import)."""
from __future__ import annotations

from qingzhou._lazy import lazy_getattr

_LAZY = {
    "quantize": "qingzhou.compress.quantize.api",
    "save_quantized": "qingzhou.compress.quantize.formats.gptq_layout",
    "load_quantized": "qingzhou.compress.quantize.formats.gptq_layout",
    "run_layerwise": "qingzhou.compress.calibrate",
    "LayerwiseOptions": "qingzhou.compress.calibrate",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
