"""Block tuning: after GPTQ has rounded a decoder layer, train its group scales (and, with `lr > 0`,
its codes) so that the *layer's output* matches its target (EfficientQAT's Block-AP, started from
GPTQ's codes instead of round-to-nearest). Default: scales only; on SmolLM2 3-bit, training the
codes too raised every layer's output error above GPTQ's (gradient-picked flips undo GPTQ's error
compensation), while scales alone lowered it.

Why: GPTQ fits each linear to its own inputs one at a time; the errors of q/k/v, o, gate/up and down
meet only in the layer's output, through softmax and SiLU, which no per-linear solve sees. Training
the whole layer against its output lets the codes of one linear make up for another's. The file
does not change: each linear keeps its bits, group size, zero points and g_idx; only the fp16
scales (and, if asked, which integer code each weight takes) move.

How: every quantised linear of the layer gets a rounding offset V per weight (in grid steps,
initialised at 0, so training starts exactly at GPTQ's codes c) and a per-group scale multiplier m
(initialised at 1). The forward pass uses the fake-quantised weight
`(clamp(round(c + V), 0, maxq) - z) * s * m` with a straight-through round, so gradients reach both
V and m. Adam runs `steps` steps over the layer's cached calibration batches (one batch a step);
the loss is the mean squared error of the layer output against `targets`. At the end the codes and
fp16 scales are re-derived from V and m, and the result is kept only if the layer's loss over all
batches went down (else GPTQ's weights stay): tuning can never make a layer worse on its own data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qingzhou.compress.calibrate import LayerBatch, _layer_output, write_weight
from qingzhou.llm.quantized.grid import QuantizedWeight


@dataclass(frozen=True)
class BlockTuneSettings:
    """`steps` Adam steps per decoder layer (0: off), one cached calibration batch each; `lr`: the
    rounding offsets' step, in grid steps; `scale_lr`: the scale multipliers' (relative) step."""

    steps: int = 0
    lr: float = 0.0
    scale_lr: float = 1e-3


class _Latent:
    """One linear's trainable state: a rounding offset V (in grid steps, within [-1, 1], so each
    code can move one step up or down) and a per-group scale multiplier m. V is relative to the
    step, as in AutoRound, so one learning rate means the same for every group and bit width."""

    def __init__(self, qw: QuantizedWeight, device: torch.device) -> None:
        self.qw = qw
        self.g = qw.g_idx.long().to(device)
        self.s0 = qw.scales.float().to(device)  # [groups, out]
        self.z = qw.zeros.float().to(device)[self.g].T  # [out, in]
        self.c = qw.codes.float().to(device)  # GPTQ's codes: training starts exactly there
        self.v = nn.Parameter(torch.zeros_like(self.c))
        self.m = nn.Parameter(torch.ones_like(self.s0))
        self.maxq = qw.scheme.maxq

    def weight(self) -> torch.Tensor:
        """The fake-quantised weight, differentiable in V (straight-through round) and in m."""
        x = self.c + self.v
        q = torch.clamp(x + (torch.round(x) - x).detach(), 0, self.maxq)
        return (q - self.z) * (self.s0 * self.m)[self.g].T

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """Codes and fp16 scales from the trained V and m."""
        scales = (self.s0 * self.m).clamp_min(2.0**-24).half()
        codes = torch.clamp(torch.round(self.c + self.v), 0, self.maxq)
        return QuantizedWeight(codes=codes.to(torch.uint8).cpu(), scales=scales.cpu(), zeros=self.qw.zeros,
                               g_idx=self.qw.g_idx, scheme=self.qw.scheme)


def _layer_loss(layer: nn.Module, weights: dict[str, torch.Tensor], batch: LayerBatch,
                target: torch.Tensor, device: torch.device) -> torch.Tensor:
    b = batch.to(device)
    out = _layer_output(torch.func.functional_call(layer, weights, (b.hidden,), b.kwargs))
    return torch.nn.functional.mse_loss(out.float(), target.to(device).float())


@torch.no_grad()
def _total_loss(layer: nn.Module, weights: dict[str, torch.Tensor], inputs: list[LayerBatch],
                targets: list[torch.Tensor], device: torch.device) -> float:
    total = sum(float(_layer_loss(layer, weights, b, t, device)) * b.tokens for b, t in zip(inputs, targets))
    return total / max(1, sum(b.tokens for b in inputs))


def tune_layer(layer: nn.Module, quantized: dict[str, QuantizedWeight], inputs: list[LayerBatch],
               targets: list[torch.Tensor], settings: BlockTuneSettings) -> dict[str, Any] | None:
    """Tune the quantised linears of `layer` ({name inside the layer: its GPTQ result}) towards
    `targets` (per batch, the layer outputs to match). Rewrites the linears' weights in place and
    returns {"loss_before", "loss_after", "kept", "quantized": {name: QuantizedWeight}}; None when
    there is nothing to tune."""
    if settings.steps <= 0 or not quantized or not inputs:
        return None
    device = next(layer.parameters()).device
    latents = {name: _Latent(qw, device) for name, qw in quantized.items()}
    frozen = [p for p in layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        before = _total_loss(layer, {}, inputs, targets, device)
        groups = [{"params": [lat.m for lat in latents.values()], "lr": settings.scale_lr}]
        if settings.lr > 0:  # else the codes stay GPTQ's and only the scales train
            groups.append({"params": [lat.v for lat in latents.values()], "lr": settings.lr})
        opt = torch.optim.Adam(groups)
        with torch.enable_grad():
            for step in range(settings.steps):
                j = step % len(inputs)
                weights = {f"{name}.weight": lat.weight() for name, lat in latents.items()}
                loss = _layer_loss(layer, weights, inputs[j], targets[j], device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for lat in latents.values():
                    lat.clamp_()
        tuned = {name: lat.export() for name, lat in latents.items()}
        trial = {f"{name}.weight": qw.dequantize().to(device) for name, qw in tuned.items()}
        after = _total_loss(layer, trial, inputs, targets, device)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    kept = after < before
    if kept:
        for name, w in trial.items():
            write_weight(layer.get_submodule(name.removesuffix(".weight")), w)
    return {"loss_before": before, "loss_after": after, "kept": kept, "quantized": tuned if kept else quantized}
