"""Weight quantization: RTN, GPTQ, AWQ, SmoothQuant W8A8, bitsandbytes; packed layers; GPTQ and GGUF formats.

Import cost matters (recipes validate before torch loads), so the heavy names are resolved lazily:
`from qingzhou.compress.quantize import quantize` imports torch, `...quantize.config` does not.
"""
from __future__ import annotations

from qingzhou._lazy import lazy_getattr

_LAZY = {
    "quantize": "qingzhou.compress.quantize.api",
    "QuantizeReport": "qingzhou.compress.quantize.api",
    "QuantLinear": "qingzhou.llm.quantized.qlinear",
    "save_quantized": "qingzhou.llm.quantized.gptq_layout",
    "load_quantized": "qingzhou.llm.quantized.gptq_layout",
    "QuantScheme": "qingzhou.llm.quantized.grid",
    "QuantizedWeight": "qingzhou.llm.quantized.grid",
    "register_quantizer": "qingzhou.compress.quantize.registry",
    "parse_config": "qingzhou.compress.quantize.registry",
    "QUANTIZERS": "qingzhou.compress.quantize.registry",
    "RTNConfig": "qingzhou.compress.quantize.rtn",
    "GPTQConfig": "qingzhou.compress.quantize.gptq",
    "AWQConfig": "qingzhou.compress.quantize.awq",
    "awq_scale": "qingzhou.compress.quantize.awq",
    "SmoothQuantConfig": "qingzhou.compress.quantize.smoothquant",
    "smooth": "qingzhou.compress.quantize.smoothquant",
    "W8A8Linear": "qingzhou.compress.quantize.smoothquant",
    "BnbConfig": "qingzhou.compress.quantize.bnb",
    "load_bnb": "qingzhou.compress.quantize.bnb",
    "export_gguf": "qingzhou.compress.quantize.formats.gguf",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
