"""SmoothQuant W8A8 (Xiao et al. 2023): move activation outliers into the weights, then int8 both.

Per decoder layer, from the calibration inputs: `s_j = max|X_j|^a / max|W_j|^(1-a)` per input
channel `j` (max over tokens and over all linears reading that input), folded into the feeding
RMSNorm (`scaling.py`; by default the two norms, as the paper and llm-compressor do for Llama).
Then every planned linear becomes a `W8A8Linear`: int8 symmetric per-output-channel weights and
int8 symmetric *per-token dynamic* activations, simulated in pure torch so it runs everywhere and
measures the accuracy an int8 GEMM kernel would give.

Saving: `save_format: dense` writes the smoothed model with weights on the int8 grid; activation
quantisation is applied in memory only (no W8A8 checkpoint format yet).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from qingzhou.compress.quantize.config import CalibratedConfig
from qingzhou.compress.quantize.registry import register_quantizer

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from qingzhou.compress.quantize.grid import QuantScheme


class SmoothQuantConfig(CalibratedConfig):
    method: Literal["smoothquant"] = "smoothquant"
    bits: int = Field(8, ge=8, le=8, description="int8 weights (per output channel) and activations")
    group_size: int = -1
    sym: bool = True
    clip_search: bool = False
    alpha: float = Field(0.5, ge=0, le=1, description="migration strength: 0 = no smoothing, 1 = all onto weights")
    smooth_linear_inputs: bool = Field(False, description="also smooth v->o and up->down (folded into the "
                                                          "previous linear), beyond the two norms")
    quantize_activations: bool = Field(True, description="simulate per-token int8 activations (W8A8); "
                                                         "False = W8A16")
    pack: bool = False

    @model_validator(mode="after")
    def _dense_only(self) -> SmoothQuantConfig:
        if self.pack:
            raise ValueError("smoothquant keeps W8A8Linear layers; it has no packed GPTQ form (pack: false, "
                             "save_format: dense)")
        if self.group_size != -1 or not self.sym:
            raise ValueError("smoothquant uses symmetric per-channel int8 weights (group_size: -1, sym: true)")
        return self


@register_quantizer("smoothquant", SmoothQuantConfig)
def run_smoothquant(model: nn.Module, cfg: SmoothQuantConfig, plan: dict[str, QuantScheme], calib: Any
                    ) -> dict[str, Any]:
    """Smooth, then replace every planned linear by a `W8A8Linear`."""
    collector = SmoothQuantCollector(plan, cfg, quantize_weights=True)
    report = _walk(model, cfg, plan, calib, collector)
    return {"modules": collector.results, "calibration": report.to_dict()}


def smooth(model: nn.Module, cfg: SmoothQuantConfig | dict[str, Any], calib: list) -> dict[str, int]:
    """Only the smoothing (float model, same function). Returns the smoothed groups' widths."""
    from qingzhou.compress.quantize.plan import build_plan

    cfg = cfg if isinstance(cfg, SmoothQuantConfig) else SmoothQuantConfig.model_validate(
        {"method": "smoothquant", **cfg})
    plan, _ = build_plan(model, cfg)
    collector = SmoothQuantCollector(plan, cfg, quantize_weights=False)
    _walk(model, cfg, plan, calib, collector)
    return collector.smoothed


def _walk(model, cfg, plan, calib, collector):
    from qingzhou.compress.calibrate import find_decoder_layers, run_layerwise

    collector.layers_path = find_decoder_layers(model)[1]
    return run_layerwise(model, calib, collector, targets=plan.__contains__, device=cfg.device,
                         true_sequential=True, batch_size=cfg.batch_size, offload_inputs=cfg.offload_inputs)


class SmoothQuantCollector:
    """Calibration-engine callback: smoothing in `begin_layer`, int8 layers in `finish_group`."""

    def __init__(self, plan: dict[str, QuantScheme], cfg: SmoothQuantConfig, *, quantize_weights: bool):
        self.plan, self.cfg, self.quantize_weights = plan, cfg, quantize_weights
        self.results: dict[str, dict[str, Any]] = {}
        self.smoothed: dict[str, int] = {}
        self.layers_path = "model.layers"

    def begin_layer(self, index: int, layer: nn.Module, inputs: list) -> None:
        import torch

        from qingzhou.compress.quantize.scaling import fold_scales, scale_groups

        groups = scale_groups(layer)
        if not self.cfg.smooth_linear_inputs:
            modules = dict(layer.named_modules())
            groups = [g for g in groups if not isinstance(modules[g.prev], torch.nn.Linear)]
        if not groups or self.cfg.alpha == 0:
            return
        x_max = _input_absmax(layer, [g.linears[0] for g in groups], inputs)
        modules = dict(layer.named_modules())
        with torch.no_grad():
            for g in groups:
                w_max = torch.stack([modules[n].weight.detach().abs().amax(0).float() for n in g.linears]).amax(0)
                a = self.cfg.alpha
                s = (x_max[g.linears[0]].clamp(min=1e-5).pow(a) / w_max.clamp(min=1e-5).pow(1 - a)).clamp(min=1e-5)
                s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
                fold_scales(layer, g, s)
                self.smoothed[f"{self.layers_path}.{index}.{g.prev}"] = int(s.numel())

    def add_batch(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        """Nothing to accumulate: int8 weights need no statistics once smoothed."""

    def finish_group(self, index: int, layer: nn.Module, names: list[str]) -> None:
        from qingzhou.compress.quantize.grid import rtn_quantize_weight

        if not self.quantize_weights:
            return
        prefix = f"{self.layers_path}.{index}."
        for name in names:
            rel = name[len(prefix):]
            lin = layer.get_submodule(rel)
            qw = rtn_quantize_weight(lin.weight, self.plan[name])
            new = _w8a8_module()(qw.dequantize().to(lin.weight.device), lin.bias, self.cfg.quantize_activations)
            layer.set_submodule(rel, new)
            self.results[name] = {"quantized": qw, "act_bits": 8 if self.cfg.quantize_activations else 16}


def _input_absmax(layer: nn.Module, names: list[str], inputs: list) -> dict[str, torch.Tensor]:
    """max |x| per input channel over all calibration tokens, for the named linears."""
    import torch

    from qingzhou.compress.quantize.scaling import observe_inputs

    out: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        m = x.abs().amax(0)
        out[name] = torch.maximum(out[name], m) if name in out else m

    observe_inputs(layer, names, inputs, observe)
    return out


@functools.lru_cache(maxsize=1)
def _w8a8_module():
    import torch.nn.functional as F
    from torch import nn

    class W8A8Linear(nn.Module):
        """Linear with int8-grid weights and per-token dynamic int8 activations (simulated)."""

        def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quantize_activations: bool = True):
            super().__init__()
            self.out_features, self.in_features = weight.shape
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
            self.quantize_activations = quantize_activations

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.quantize_activations:
                x = quantize_per_token(x)
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, w8a8=True"

    return W8A8Linear


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric absmax fake quantisation of each token (last dim) to `bits` (dynamic, no calibration)."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def __getattr__(name: str) -> Any:  # `W8A8Linear` is built lazily so this file imports without torch
    if name == "W8A8Linear":
        return _w8a8_module()
    raise AttributeError(name)
