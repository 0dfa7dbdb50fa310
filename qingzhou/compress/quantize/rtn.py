"""Round-to-nearest (RTN): the data-free baseline, 2-8 bits, sym/asym, per-channel or grouped.

With `clip_search` (default) each group's range is shrunk to the factor that minimises its rounding
error, which alone closes much of the gap to calibrated methods at 3-4 bits.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from qingzhou.compress.quantize.config import QuantizeConfig
from qingzhou.compress.quantize.registry import register_quantizer

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from qingzhou.llm.quantized.grid import QuantScheme


class RTNConfig(QuantizeConfig):
    method: Literal["rtn"] = "rtn"


@register_quantizer("rtn", RTNConfig, needs_calibration=False)
def run_rtn(model: nn.Module, cfg: RTNConfig, plan: dict[str, QuantScheme], calib: Any) -> dict[str, Any]:
    """Quantise every planned linear in place (fake-quant) and return their codes."""
    import torch

    from qingzhou.compress.calibrate import apply_quantized
    from qingzhou.llm.quantized.grid import rtn_quantize_weight

    out = {}
    with torch.no_grad():
        for name, scheme in plan.items():
            lin = model.get_submodule(name)
            out[name] = {"quantized": apply_quantized(lin, rtn_quantize_weight(lin.weight, scheme))}
    return {"modules": out}
