"""SparseGPT (Frantar & Alistarh 2023): prune with optimal-brain-surgeon weight reconstruction.

Columns are visited left to right in blocks of `block_size`. For each block the mask is chosen
*adaptively* from the current (already error-corrected) weights with the OBS saliency
w^2 / [H^-1]_jj^2 - over the whole block for unstructured sparsity, or over each group of M
columns for N:M - and every removed weight's error is pushed onto the columns not yet visited
through the Cholesky factor of the inverse Hessian, so the layer's outputs on calibration data
change as little as possible. Optionally the kept weights are quantised in the same pass (the
paper's joint sparsification + quantisation), which makes the later quantisation error-aware too.

The Hessian accumulation, the damped inverse Cholesky and the engine callback base are the ones
GPTQ uses (`compress.hessian`), shared rather than copied.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qingzhou.compress.hessian import HessianCollector
from qingzhou.compress.prune.config import CalibratedPruneConfig
from qingzhou.compress.prune.registry import register_pruner

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from qingzhou.compress.prune.masks import Target
    from qingzhou.llm.quantized.grid import QuantScheme


class JointQuantConfig(BaseModel):
    """Quantise the kept weights during pruning (dense fake-quant weights on the grid)."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, ge=2, le=8)
    group_size: int = Field(128, description="-1 = one group per output row")
    sym: bool = False


class SparseGPTConfig(CalibratedPruneConfig):
    method: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(128, ge=1, description="columns per block: the mask is chosen per block "
                                                   "(adaptive mask selection) and updates are lazy")
    damp_percent: float = Field(0.01, ge=0, le=1, description="damping as a fraction of mean(diag H); "
                                                              "raised x10 automatically on Cholesky failure")
    quantize: JointQuantConfig | None = Field(None, description="also quantise in the same pass")


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # [out, in] float32, pruned (and quantised) and reconstructed
    mask: torch.Tensor  # True = removed
    loss: float  # OBS proxy: sum of (w - q)^2 / (2 [H^-1]_jj^2)
    damp_percent: float
    damp_retries: int


def sparsegpt_prune_weight(
    weight: torch.Tensor, H: torch.Tensor, target: Target, *, block_size: int = 128,
    damp_percent: float = 0.01, quant: QuantScheme | None = None, name: str = "",
) -> SparseGPTResult:
    """Prune one [out, in] weight to `target` given its inputs' Hessian H = 2/n X^T X."""
    import torch

    from qingzhou.compress.hessian import damped_inverse_cholesky, solver_hessian

    with torch.no_grad():
        W = weight.detach().float().clone()
        rows, cols = W.shape
        H = solver_hessian(H, W.device)
        inv = damped_inverse_cholesky(H, damp_percent, name=name)
        Hinv = inv.chol_inv_upper
        del H
        nm = target.nm
        if nm is not None and block_size % nm[1]:
            block_size = max(nm[1], block_size - block_size % nm[1])  # groups must not straddle blocks
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
        losses = torch.zeros(rows, device=W.device)
        scale = zero = None
        gs = quant.effective_group_size(cols) if quant is not None else 0
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d1 = torch.diag(Hinv1)
            if nm is None:
                mask1 = _block_mask(W1, d1, target.sparsity, i1)
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                col = i1 + i
                if nm is not None and i % nm[1] == 0:
                    sal = W1[:, i : i + nm[1]] ** 2 / d1[i : i + nm[1]][None, :] ** 2
                    idx = torch.topk(sal, nm[1] - nm[0], dim=1, largest=False).indices
                    mask1.scatter_(1, i + idx, True)
                w = W1[:, i]
                d = Hinv1[i, i]
                q = w.clone()
                if quant is not None:
                    if col % gs == 0:
                        scale, zero = _group_params(W1, W, i, i2, gs, quant)
                    q = _fake_quant(q, scale, zero, quant.maxq)
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                losses += (w - q) ** 2 / d**2 / 2
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            mask[:, i1:i2] = mask1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if not torch.isfinite(W).all():  # never hand back a silent NaN
            raise FloatingPointError(f"{name}: SparseGPT produced non-finite weights")
        return SparseGPTResult(W, mask, float(losses.sum()), inv.damp_percent, inv.retries)


def _block_mask(W1: torch.Tensor, d1: torch.Tensor, sparsity: float, i1: int) -> torch.Tensor:
    """Adaptive mask for one column block: the lowest OBS saliencies w^2 / [H^-1]_jj^2 over the
    whole block. The count per block is the running difference of int(sparsity * rows * columns
    so far), so the matrix ends with exactly int(sparsity * numel) zeros whatever the block widths.
    """
    from qingzhou.compress.prune.masks import lowest_k_mask

    rows, width = W1.shape
    want = int(sparsity * rows * (i1 + width) + 1e-9) - int(sparsity * rows * i1 + 1e-9)
    return lowest_k_mask(W1**2 / d1[None, :] ** 2, want)


def _group_params(W1: torch.Tensor, W: torch.Tensor, i: int, i2: int, gs: int, quant: QuantScheme):
    """Grid of the group starting at block column i, read from the error-updated columns."""
    import torch

    from qingzhou.llm.quantized.grid import find_params

    end = i + gs
    width = W1.shape[1]
    seg = W1[:, i:end] if end <= width else torch.cat([W1[:, i:], W[:, i2 : i2 + end - width]], dim=1)
    return find_params(seg, quant.bits, quant.sym, quant.clip_search)


def _fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    from qingzhou.llm.quantized.grid import fake_quantize

    return fake_quantize(w, scale, zero, maxq)


class SparseGPTCollector(HessianCollector):
    """Engine callback: accumulate each linear's Hessian, then prune and reconstruct it."""

    def __init__(self, plan: dict[str, Target], *, block_size: int, damp_percent: float, quant: QuantScheme | None):
        super().__init__()
        self.plan = plan
        self.opts = dict(block_size=block_size, damp_percent=damp_percent, quant=quant)

    def solve(self, name: str, module: nn.Linear, acc: Any) -> dict[str, Any]:
        from qingzhou.compress.calibrate import write_weight

        res = sparsegpt_prune_weight(module.weight, self.take_hessian(acc), self.plan[name], name=name, **self.opts)
        write_weight(module, res.weight)
        return {"loss": res.loss, "tokens": acc.n, "damp_percent": res.damp_percent, "damp_retries": res.damp_retries}

    def fallback(self, name: str, module: nn.Linear) -> dict[str, Any]:
        from qingzhou.compress.prune.magnitude import magnitude_prune_weight

        warnings.warn(f"{name}: no calibration tokens reached it; pruned by magnitude", stacklevel=3)
        module.weight.masked_fill_(magnitude_prune_weight(module.weight, self.plan[name]), 0)
        return {"fallback": "magnitude"}


@register_pruner("sparsegpt", SparseGPTConfig)
def run_sparsegpt(model: nn.Module, cfg: SparseGPTConfig, plan: dict[str, Target], calib: Any) -> dict[str, Any]:
    from qingzhou.compress.calibrate import LayerwiseOptions, run_layerwise
    from qingzhou.llm.quantized.grid import QuantScheme

    quant = None
    if cfg.quantize is not None:
        q = cfg.quantize
        quant = QuantScheme(bits=q.bits, group_size=q.group_size, sym=q.sym, clip_search=True)
    collector = SparseGPTCollector(plan, block_size=cfg.block_size, damp_percent=cfg.damp_percent, quant=quant)
    report = run_layerwise(model, calib, collector, LayerwiseOptions.from_config(cfg, targets=plan.__contains__))
    return {"modules": collector.results, "calibration": report.to_dict()}
