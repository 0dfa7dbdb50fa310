"""Weight quantization: RTN, GPTQ, AWQ, SmoothQuant W8A8, bitsandbytes; packed layers; GPTQ and GGUF formats.

Import cost matters (recipes validate before torch loads), so the heavy names are resolved lazily:
`from qingzhou.compress.quantize import quantize` imports torch, `...quantize.config` does not.
"""
from __future__ import annotations

from qingzhou._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".api": "quantize QuantizeReport",
    "qingzhou.llm.quantized.qlinear": "QuantLinear",
    "qingzhou.llm.quantized.gptq_layout": "save_quantized load_quantized",
    "qingzhou.llm.quantized.grid": "QuantScheme QuantizedWeight",
    ".registry": "register_quantizer parse_config QUANTIZERS",
    ".rtn": "RTNConfig",
    ".gptq": "GPTQConfig",
    ".awq": "AWQConfig awq_scale",
    ".smoothquant": "SmoothQuantConfig smooth W8A8Linear",
    ".bnb": "BnbConfig load_bnb",
    ".formats.gguf": "export_gguf",
})
