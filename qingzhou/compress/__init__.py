"""Compression: quantization (`compress.quantize`), and the shared layer-by-layer calibration
engine (`compress.calibrate`) that pruning methods reuse. Names resolve lazily (no torch at import)."""
from __future__ import annotations

from qingzhou._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".quantize.api": "quantize",
    "qingzhou.llm.quantized.gptq_layout": "save_quantized load_quantized",
    ".calibrate": "run_layerwise LayerwiseOptions",
})
