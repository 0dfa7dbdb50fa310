"""GPTQ's column-by-column solver (Frantar et al. 2022) and its calibration-engine callback.

For each linear: quantise one input column at a time and push its rounding error onto the
not-yet-quantised columns through the inverse Hessian, so the layer's *outputs* on calibration
data move as little as possible. Options follow GPTQ/AutoGPTQ: group size, act-order (columns in
decreasing Hessian diagonal, i.e. most-used inputs first), static groups (group parameters fixed
from the unpermuted weight, so g_idx stays trivial), lazy block updates, damping.

Differences from the reference, all for quality or robustness:
* group parameters are found on the *error-updated* columns of the current block (the reference
  reads the stale full matrix when group_size < block_size);
* group ranges use the clip search of `grid.find_params` and v1-safe zero points;
* dead input channels (zero Hessian diagonal) keep their weights instead of being zeroed;
* Cholesky failures retry with 10x damping and warn (`hessian.damped_inverse_cholesky`);
* a linear that received no calibration tokens falls back to RTN with a warning.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qingzhou.compress.calibrate import _layer_output, apply_quantized, write_weight
from qingzhou.compress.dense_target import DenseStream
from qingzhou.compress.quantize.block_tune import BlockTuneSettings, tune_layer
from qingzhou.compress.hessian import (
    HessianAccumulator,
    HessianCollector,
    damped_inverse_cholesky,
    solver_hessian,
)
from qingzhou.llm.quantized.grid import (
    QuantizedWeight,
    QuantScheme,
    find_params,
    quantize_to_codes,
    rtn_quantize_weight,
)


@dataclass
class GPTQResult:
    quantized: QuantizedWeight
    weight: torch.Tensor  # dequantised [out, in] float32
    loss: float  # GPTQ's proxy: sum over columns of (w - q)^2 / (2 * Hinv_jj^2)
    damp_percent: float
    damp_retries: int


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor, H: torch.Tensor | list[torch.Tensor], scheme: QuantScheme, *, block_size: int = 128,
    damp_percent: float = 0.01, act_order: bool = True, static_groups: bool = False, name: str = "",
    hessian_clip: bool = False, refit: bool = False,
) -> GPTQResult:
    """GPTQ of `weight` [out, in] on the proxy Hessian `H`; `refit`: afterwards, the least-squares
    group scales for the chosen codes (`scale_refit.refit_scales`).

    `H` is only read. Passed as a one-element list, it is handed over: the solver pops it and works
    on it without a copy (its act-order permutation then replaces it), so a caller that keeps no
    other reference saves two [in, in] float32 matrices at the peak (what a streamed big model's
    down_proj needs most)."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    if isinstance(H, list):
        H = solver_hessian(H.pop(), W.device, copy=False)
    else:
        H = solver_hessian(H, W.device)
    gs = scheme.effective_group_size(cols)
    n_groups = scheme.groups(cols)
    maxq = scheme.maxq
    scales = torch.zeros(n_groups, rows, device=W.device)
    zeros = torch.zeros(n_groups, rows, device=W.device)

    hdiag = torch.diag(H).clone() if hessian_clip else None  # columns' input energy, weighs the clip search

    def params(w: torch.Tensor, d: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return find_params(w, scheme.bits, scheme.sym, scheme.clip_search, col_weight=d)

    if static_groups:
        for g in range(n_groups):
            cut = slice(g * gs, (g + 1) * gs)
            scales[g], zeros[g] = params(W[:, cut], None if hdiag is None else hdiag[cut])
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm]  # one statement per index: two [n, n] copies at a time, not three
        H = H[:, perm]
        hdiag = None if hdiag is None else hdiag[perm]
    inv = damped_inverse_cholesky(H, damp_percent, name=name)
    Hinv = inv.chol_inv_upper
    if not refit:
        del H

    codes = torch.zeros(rows, cols, device=W.device)
    col_group = [0] * cols  # group of each (possibly permuted) column
    losses = torch.zeros(rows, device=W.device)
    orig_col = perm.tolist() if perm is not None else list(range(cols))
    scale = zero = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):  # the hot loop: as few tensor ops per column as possible
            col = i1 + i
            if static_groups:
                g = orig_col[col] // gs
                scale, zero = scales[g], zeros[g]
            else:
                g = col // gs
                if col % gs == 0:
                    end = col + gs
                    seg = W1[:, i : i + gs] if end <= i2 else torch.cat([W1[:, i:], W[:, i2:end]], dim=1)
                    scale, zero = params(seg, None if hdiag is None else hdiag[col:end])
                    scales[g], zeros[g] = scale, zero
            col_group[col] = g
            w = W1[:, i]
            q_codes = quantize_to_codes(w, scale, zero, maxq)
            codes[:, col] = q_codes
            err = Err1[:, i]
            torch.sub(w, (q_codes - zero).mul_(scale), out=err)
            err.div_(Hinv1[i, i])
            W1[:, i + 1:].addr_(err, Hinv1[i, i + 1:], alpha=-1)
        losses += Err1.square().sum(1) / 2  # GPTQ's proxy: (w - q)^2 / Hinv_jj^2 / 2 per column
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[torch.tensor(orig_col)] = torch.tensor(col_group, dtype=torch.int32)
    if refit:  # in the solver's column order, where H is
        from qingzhou.compress.quantize.scale_refit import refit_scales

        target = weight.detach().float()
        scales, _ = refit_scales(target if perm is None else target[:, perm], codes, scales, zeros,
                                 torch.tensor(col_group, dtype=torch.int32), H)
        del H, target
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    gl = g_idx.long().to(W.device)  # the dequantised weight, with exactly the loaders' arithmetic
    Q = (codes - zeros[gl].T) * scales[gl].T
    if not torch.isfinite(Q).all():  # never hand back a silent NaN
        raise FloatingPointError(f"{name}: GPTQ produced non-finite weights")
    qw = QuantizedWeight(codes=codes.to(torch.uint8).cpu(), scales=scales.half().cpu(),
                         zeros=zeros.to(torch.int32).cpu(), g_idx=g_idx, scheme=scheme)
    return GPTQResult(qw, Q, float(losses.sum()), inv.damp_percent, inv.retries)


class GPTQCollector(HessianCollector):
    """Calibration-engine callback: accumulate each linear's Hessian, then run the solver."""

    def __init__(self, plan: dict[str, QuantScheme], *, block_size: int, damp_percent: float,
                 act_order: bool, static_groups: bool, hessian_clip: bool = False, dense_target: float = 0.0,
                 refit_max_bits: int = 0, block_tune: BlockTuneSettings | None = None,
                 block_tune_target: float = 0.0):
        super().__init__()
        self.plan = plan
        self.opts = dict(block_size=block_size, damp_percent=damp_percent, act_order=act_order,
                         static_groups=static_groups, hessian_clip=hessian_clip)
        self.refit_max_bits = refit_max_bits
        self.dense = DenseStream() if dense_target > 0 else None
        self.dense_alpha = dense_target
        self.tune = block_tune if block_tune is not None and block_tune.steps > 0 else None
        self.tune_target = block_tune_target if self.dense is not None else 0.0
        self.targets: list[torch.Tensor] = []  # the layer outputs block tuning matches, per batch

    def begin_layer(self, index: int, layer: nn.Module, inputs: list[Any]) -> None:
        if self.dense is not None:  # dense inputs only for the linears the plan quantises (memory)
            self.dense.begin_layer(layer, inputs, [m for rel, m in layer.named_modules() if isinstance(m, nn.Linear)
                                                   and any(k.endswith(f".{index}.{rel}") for k in self.plan)])
        if self.tune is not None:
            self.targets = self._tune_targets(layer, inputs)

    @torch.no_grad()
    def _tune_targets(self, layer: nn.Module, inputs: list[Any]) -> list[torch.Tensor]:
        """The original layer's outputs on the engine's inputs, moved `tune_target` of the way
        toward the dense model's outputs (the dense-target idea, `compress/dense_target.py`, at
        the level of the layer)."""
        a = self.tune_target
        dense = self.dense.next_hidden if self.dense is not None and a > 0 else None
        device = next(layer.parameters()).device
        out = []
        for j, b in enumerate(inputs):
            own = None
            if a < 1 or dense is None:
                bb = b.to(device)
                own = _layer_output(layer(bb.hidden, **bb.kwargs)).to(b.hidden.device)
            if dense is None:
                out.append(own)
            elif own is None:
                out.append(dense[j])
            else:
                out.append(own.lerp_(dense[j].to(own.device, own.dtype), a))
        return out

    def refine_layer(self, index: int, layer: nn.Module, inputs: list[Any]) -> bool:
        """Block tuning (`block_tune.py`) of this layer's GPTQ results; True if weights changed."""
        if self.tune is None:
            return False
        names = {rel: full for rel, m in layer.named_modules() if isinstance(m, nn.Linear)
                 for full in self.results if full.endswith(f".{index}.{rel}")
                 and "quantized" in self.results[full] and "fallback" not in self.results[full]}
        res = tune_layer(layer, {rel: self.results[full]["quantized"] for rel, full in names.items()},
                         inputs, self.targets, self.tune)
        self.targets = []
        if res is None:
            return False
        for rel, full in names.items():  # per module, so the report (and a streamed run's) keeps it
            self.results[full]["quantized"] = res["quantized"][rel]
            self.results[full]["block_tune"] = {"layer_mse_before": res["loss_before"],
                                                "layer_mse_after": res["loss_after"], "kept": res["kept"]}
        logging.getLogger(__name__).info("layer %d block tuning: output MSE %.4g -> %.4g%s", index,
                                         res["loss_before"], res["loss_after"], "" if res["kept"] else " (not kept)")
        return bool(res["kept"])

    def end_layer(self, index: int, layer: nn.Module) -> None:
        if self.dense is not None:
            self.dense.end_layer()

    @property
    def carries(self) -> bool:
        return self.dense is not None

    def carried(self) -> list[torch.Tensor] | None:
        return self.dense.hidden if self.dense is not None else None

    def restore_carried(self, tensors: list[torch.Tensor]) -> None:
        if self.dense is not None:
            self.dense.hidden = tensors

    def add_batch(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        super().add_batch(name, module, x)
        if self.dense is not None:
            self.dense.add(module, x)

    def solve(self, name: str, module: nn.Linear, acc: HessianAccumulator) -> dict[str, Any]:
        H = self.take_hessian(acc)
        target = None
        if self.dense is not None:
            target = self.dense.correct(module, H, acc.n, self.opts["damp_percent"], self.dense_alpha,  # type: ignore[arg-type]
                                        name=name)
        scheme = self.plan[name]
        handed = [H]  # handed over: the solver permutes it instead of copying it (peak memory)
        del H
        res = gptq_quantize_weight(module.weight if target is None else target, handed, scheme, name=name,
                                   refit=scheme.bits <= self.refit_max_bits, **self.opts)
        write_weight(module, res.weight)
        out = {"quantized": res.quantized, "loss": res.loss, "tokens": acc.n,
               "damp_percent": res.damp_percent, "damp_retries": res.damp_retries}
        if self.dense is not None:
            out["dense_target"] = target is not None
        return out

    def fallback(self, name: str, module: nn.Linear) -> dict[str, Any]:
        warnings.warn(f"{name}: no calibration tokens reached it; quantised with RTN", stacklevel=3)
        return {"quantized": apply_quantized(module, rtn_quantize_weight(module.weight, self.plan[name])),
                "fallback": "rtn"}
