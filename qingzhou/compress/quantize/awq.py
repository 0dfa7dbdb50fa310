"""AWQ: activation-aware scaling and clipping, then round-to-nearest (Lin et al. 2023, AutoAWQ).

Per decoder layer, on its calibration inputs:
1. **Scale search.** For each foldable group (`scaling.py`: norm -> q/k/v, v -> o, norm -> gate/up,
   up -> down) try `s = mean|x|^a / mean|w~|^(1-a)` (AutoAWQ's duo scaling; `duo_scaling=False`
   gives `mean|x|^a`) for `a` in a grid over [0, 1], normalised so sqrt(max*min) = 1, plus s = 1.
   The loss of a candidate is the consumers' output error after quantising `W * s`:
   `sum((W - Q(W*s)/s) H (W - Q(W*s)/s)^T)` with `H = X^T X`, so all candidates are scored with
   matmuls on an [in, in] matrix instead of re-running the layer on every token (AutoAWQ runs the
   parent module per candidate; using the consumers' own outputs keeps the search exact for the
   linears and ~50x cheaper on CPU). The winner is folded into the feeding op, which leaves the
   float model's function unchanged.
2. **Clip search.** Each (output row, group) range [min, max] is shrunk by the factor in
   1 ... 1-max_shrink that minimises that group's output error `d^T H_gg d` (activation-aware,
   unlike RTN's weight-MSE clip).
3. **Quantise** with those ranges on the shared grid (`grid.py`), so packing and checkpoints are
   the same as RTN/GPTQ. `solver: gptq` instead rounds the scaled weights with GPTQ's error
   feedback (`gptq_solver.py`) on the same Hessians: the "AWQ scaling before GPTQ" combination.

Scales come from the layer's inputs before any of its linears are quantised; the clip search sees
the inputs the engine hands over (after earlier groups were quantised, with `true_sequential`).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from qingzhou.compress.hessian import HessianAccumulator, HessianCollector
from qingzhou.compress.quantize.config import CalibratedConfig
from qingzhou.compress.quantize.registry import register_quantizer

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from qingzhou.llm.quantized.grid import QuantizedWeight, QuantScheme

_CHUNK = 2**24  # floats per candidate batch in the vectorised searches (~64 MB)


class AWQConfig(CalibratedConfig):
    method: Literal["awq"] = "awq"
    n_grid: int = Field(20, ge=1, description="scale exponents tried: a = 0, 1/n, ..., (n-1)/n")
    duo_scaling: bool = Field(True, description="divide by mean|w|^(1-a) too (AutoAWQ's default)")
    max_shrink: float = Field(0.5, ge=0, lt=1, description="clip search tries range factors 1 ... 1-max_shrink")
    clip_grid: int = Field(20, ge=1, description="number of clip factors tried")
    true_sequential: bool = Field(True, description="clip-search each group on inputs produced by the "
                                                    "already-quantised earlier groups of the layer")
    max_tokens: int = Field(0, ge=0, description="subsample at most this many tokens per layer for "
                                                 "the statistics (0 = all)")
    solver: Literal["rtn", "gptq"] = Field("rtn", description="rounding after scaling: rtn = AWQ's clip "
                                           "search + round-to-nearest; gptq = GPTQ's error feedback on the "
                                           "scaled weights (AWQ scaling before GPTQ)")
    damp_percent: float = Field(0.01, ge=0, le=1, description="GPTQ damping (solver: gptq)")
    act_order: bool | None = Field(None, description="GPTQ act-order (solver: gptq only; default on there)")

    @model_validator(mode="after")
    def _act_order_needs_gptq(self) -> AWQConfig:
        if self.act_order and self.solver != "gptq":
            raise ValueError("act_order applies to solver: gptq only")
        if self.act_order is None:
            self.act_order = self.solver == "gptq"
        return self


@register_quantizer("awq", AWQConfig)
def run_awq(model: nn.Module, cfg: AWQConfig, plan: dict[str, QuantScheme], calib: Any) -> dict[str, Any]:
    """Scale, clip and quantise layer by layer; weights are rewritten in place (fake-quant)."""
    from qingzhou.compress.quantize.scaling import run_scaling

    collector = AWQCollector(plan, cfg)
    report = run_scaling(model, cfg, plan, calib, collector, quantize_weights=True)
    return {"modules": collector.results, "calibration": {**report.to_dict(), "scales": collector.alphas}}


def awq_scale(model: nn.Module, cfg: AWQConfig | dict[str, Any], calib: list) -> dict[str, float]:
    """Only AWQ's scale search and folding (no quantisation): the float model keeps its function.

    Returns the chosen exponent per folded group (`-1` = no scaling won). Useful before GPTQ
    ("AWQ scaling before GPTQ") and for checking the folding rules.
    """
    from qingzhou.compress.quantize.scaling import scale_only

    cfg = cfg if isinstance(cfg, AWQConfig) else AWQConfig.model_validate({"method": "awq", **cfg})
    return scale_only(model, cfg, calib, AWQCollector).alphas


class AWQCollector(HessianCollector):
    """Calibration-engine callback: input statistics of each foldable group from the engine's
    observation pass, scales in `begin_layer`, clip + quantise in `finish_group`."""

    def __init__(self, plan: dict[str, QuantScheme], cfg: AWQConfig):
        super().__init__()
        self.plan, self.cfg = plan, cfg
        self.alphas: dict[str, float] = {}
        self.layers_path = "model.layers"  # set by `run_scaling` from the model
        self.groups: list[Any] = []  # this layer's `ScaleGroup`s
        self.stats: dict[str, list[torch.Tensor]] = {}  # first linear -> [H accumulator, sum |x|]

    def inputs_to_observe(self, index: int, layer: nn.Module) -> list[str]:
        from qingzhou.compress.quantize.scaling import scale_groups

        self.groups, self.stats = scale_groups(layer), {}
        if not self.groups:
            warnings.warn(f"layer {index}: no foldable norm/linear pairs ({type(layer).__name__}); "
                          "AWQ falls back to clip search only", stacklevel=2)
        return [g.linears[0] for g in self.groups]

    def observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """Accumulate H = 2/n X^T X and sum |x| per channel of a group's (shared) input."""
        import torch

        x = _subsample(x.float(), self.cfg.max_tokens)
        if name not in self.stats:
            self.stats[name] = [HessianAccumulator(x.shape[1], x.device), torch.zeros(x.shape[1], device=x.device)]
        acc, abs_sum = self.stats[name]
        acc.add(x)
        abs_sum += x.abs().sum(0)

    def begin_layer(self, index: int, layer: nn.Module, inputs: list) -> None:
        import torch

        from qingzhou.compress.quantize.scaling import fold_scales

        prefix = f"{self.layers_path}.{index}."
        with torch.no_grad():
            for g in self.groups:
                acc, abs_sum = self.stats[g.linears[0]]
                x_mean = abs_sum / max(acc.n, 1)
                planned = [(layer.get_submodule(n).weight, self.plan[prefix + n]) for n in g.linears
                           if prefix + n in self.plan]
                if not planned:
                    continue
                s, alpha = search_scale(planned, acc.H, x_mean, n_grid=self.cfg.n_grid,
                                        duo_scaling=self.cfg.duo_scaling)
                self.alphas[prefix + g.prev] = alpha
                if alpha >= 0:
                    fold_scales(layer, g, s)
        self.stats = {}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return _subsample(x, self.cfg.max_tokens)

    def solve(self, name: str, module: nn.Linear, acc: Any) -> dict[str, Any]:
        from qingzhou.compress.calibrate import apply_quantized
        from qingzhou.llm.quantized.grid import rtn_quantize_weight

        scheme = self.plan[name]
        if self.cfg.solver == "gptq":
            from qingzhou.compress.quantize.gptq import GPTQConfig
            from qingzhou.compress.quantize.gptq_solver import gptq_quantize_weight

            grid_opts = {k: GPTQConfig.model_fields[k].default for k in ("static_groups", "hessian_clip")}
            res = gptq_quantize_weight(module.weight, acc.H, scheme, name=name, damp_percent=self.cfg.damp_percent,
                                       act_order=self.cfg.act_order, **grid_opts)
            qw, extra = res.quantized, {"tokens": acc.n, "loss": res.loss, "damp_retries": res.damp_retries}
        elif self.cfg.clip_search:
            qw = clip_quantize(module.weight, acc.H, scheme, max_shrink=self.cfg.max_shrink, grid=self.cfg.clip_grid)
            extra = {"tokens": acc.n}
        else:
            qw, extra = rtn_quantize_weight(module.weight, scheme), {"tokens": acc.n}
        return {"quantized": apply_quantized(module, qw), **extra}

    def fallback(self, name: str, module: nn.Linear) -> dict[str, Any]:
        from qingzhou.compress.calibrate import apply_quantized
        from qingzhou.llm.quantized.grid import rtn_quantize_weight

        return {"quantized": apply_quantized(module, rtn_quantize_weight(module.weight, self.plan[name])),
                "fallback": "rtn"}


def _subsample(x: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Evenly spaced tokens (deterministic) when there are more than `max_tokens`."""
    import torch

    if max_tokens <= 0 or x.shape[0] <= max_tokens:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).long()
    return x[idx]


def _fake_quant_rows(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """RTN min/max fake quantisation of `w` [..., in] in groups along the last dim (no clip)."""
    import torch

    from qingzhou.llm.quantized.grid import fake_quantize, find_params

    in_f = w.shape[-1]
    gs = scheme.effective_group_size(in_f)
    cut = (in_f // gs) * gs
    parts = []
    for a, b, width in ((0, cut, gs), (cut, in_f, in_f - cut)):
        if b > a:
            seg = w[..., a:b]
            flat = seg.reshape(-1, width)
            s, z = find_params(flat, scheme.bits, scheme.sym, False)
            parts.append(fake_quantize(flat, s[:, None], z[:, None], scheme.maxq).reshape(seg.shape))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def search_scale(planned: list[tuple[torch.Tensor, QuantScheme]], H: torch.Tensor, x_mean: torch.Tensor,
                 *, n_grid: int = 20, duo_scaling: bool = True) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale for linears sharing one input (see module doc).

    Returns (s, alpha); alpha = -1 and s = 1 when no candidate beats leaving the weights unscaled.
    """
    import torch

    H = H.float()
    x_mean = x_mean.float().clamp(min=0)
    Ws = [w.detach().float() for w, _ in planned]
    cand = [torch.ones_like(x_mean)]
    alphas = [-1.0]
    w_mean = _weight_mean(Ws, planned[0][1]) if duo_scaling else None
    for i in range(n_grid):
        a = i / n_grid
        s = x_mean.pow(a).clamp(min=1e-4)
        if w_mean is not None:
            s = (s / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        cand.append(s)
        alphas.append(a)
    S = torch.stack(cand)  # [A, in]
    err = torch.zeros(S.shape[0], device=H.device)
    for W, (_, scheme) in zip(Ws, planned):
        chunk = max(1, _CHUNK // W.numel())
        for a0 in range(0, S.shape[0], chunk):
            s = S[a0 : a0 + chunk, None, :]  # [a, 1, in]
            D = W[None] - _fake_quant_rows(W[None] * s, scheme) / s
            err[a0 : a0 + chunk] += ((D @ H) * D).sum(dim=(1, 2))
    best = int(torch.argmin(err))  # ties keep the earliest: no scaling first
    if not torch.isfinite(err[best]):
        raise FloatingPointError("AWQ scale search produced a non-finite loss (non-finite activations?)")
    return S[best], alphas[best]


def _weight_mean(Ws: list[torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """AutoAWQ's mean over output rows of |w| normalised by its group's max |w|."""
    import torch

    W = torch.cat(Ws, dim=0)
    in_f = W.shape[1]
    gs = scheme.effective_group_size(in_f)
    if in_f % gs:
        gs = in_f
    g = W.abs().reshape(W.shape[0], in_f // gs, gs)
    g = g / (g.amax(dim=2, keepdim=True) + 1e-6)
    return g.reshape(W.shape).mean(0)


def clip_quantize(weight: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, *,
                  max_shrink: float = 0.5, grid: int = 20) -> QuantizedWeight:
    """Quantise with per-(row, group) ranges shrunk to minimise each group's output error d^T H_gg d."""
    import torch

    from qingzhou.llm.quantized.grid import QuantizedWeight, quantize_to_codes

    W = weight.detach().float()
    H = H.float().to(W.device)
    out_f, in_f = W.shape
    gs = scheme.effective_group_size(in_f)
    bounds = [(g0, min(g0 + gs, in_f)) for g0 in range(0, in_f, gs)]
    full = [b for b in bounds if b[1] - b[0] == gs]
    scales, zeros = [], []
    if full:
        n = len(full)
        Wb = W[:, : n * gs].reshape(out_f, n, gs).permute(1, 0, 2)  # [n, out, gs]
        Hb = torch.stack([H[a:b, a:b] for a, b in full])
        s, z = _clip_block(Wb, Hb, scheme, max_shrink, grid)
        scales.append(s), zeros.append(z)
    if len(full) < len(bounds):  # ragged last group
        a, b = bounds[-1]
        s, z = _clip_block(W[None, :, a:b], H[None, a:b, a:b], scheme, max_shrink, grid)
        scales.append(s), zeros.append(z)
    scales_t, zeros_t = torch.cat(scales), torch.cat(zeros)  # [groups, out]
    g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    gl = g_idx.long().to(W.device)
    codes = quantize_to_codes(W, scales_t[gl].T, zeros_t[gl].T, scheme.maxq)
    return QuantizedWeight(codes=codes.to(torch.uint8).cpu(), scales=scales_t.half().cpu(),
                           zeros=zeros_t.to(torch.int32).cpu(), g_idx=g_idx, scheme=scheme)


def _clip_block(Wb: torch.Tensor, Hb: torch.Tensor, scheme: QuantScheme, max_shrink: float, grid: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale, zero) [n, out] for groups Wb [n, out, gs] with Hessian blocks Hb [n, gs, gs]."""
    import torch

    from qingzhou.llm.quantized.grid import _range_to_params, fake_quantize

    n, out_f, gs = Wb.shape
    xmin = Wb.amin(dim=2).clamp(max=0)
    xmax = Wb.amax(dim=2).clamp(min=0)
    factors = [1 - max_shrink * i / grid for i in range(grid + 1)] if grid else [1.0]
    best_err = torch.full((n, out_f), float("inf"), device=Wb.device)
    best_s = torch.zeros(n, out_f, device=Wb.device)
    best_z = torch.zeros(n, out_f, device=Wb.device)
    for p in factors:
        s, z = _range_to_params((p * xmin).reshape(-1), (p * xmax).reshape(-1), scheme.maxq, scheme.sym)
        s, z = s.view(n, out_f), z.view(n, out_f)
        D = Wb - fake_quantize(Wb, s[..., None], z[..., None], scheme.maxq)
        err = ((D @ Hb) * D).sum(-1)  # [n, out]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z
