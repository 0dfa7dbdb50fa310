"""`quant_scales`: train only the per-group scales of a quantized model's `QuantLinear` layers.

Why: after GPTQ the integer codes and zero points of a 3-bit model are fixed, but each group's fp16
scale can still move. Training the scales end to end (usually with the distillation loss against
the dense model, `qingzhou distill --method quant_scales`) repairs error that layer-by-layer
calibration cannot see - how errors compound through the layers - and changes nothing in the file:
same codes, same zeros, same bytes, same runtimes. The same idea as EfficientQAT's end-to-end stage
(E2E-QP) and PEQA. Measured on SmolLM2-135M by the `fit-3` and `fit-3+kd` arms of `bench/fit_quality.py`
(fit's plan at the size of uniform 3-bit GPTQ g64, then 38 steps of 4 calibration rows, forward KL
to the dense model, lr 1e-3 cosine): WikiText-2 perplexity 28.82 -> 27.29, held-out KL 0.191 ->
0.171; uniform 3-bit GPTQ is 29.45 (2026-12-03, AVX2 CPU). With the KL-calibrated plan on an AVX-512
CPU (2026-12-05): 28.97 -> 27.31, KL 0.198 -> 0.179, uniform 3-bit GPTQ 29.89 there; trained on all
of c4_demo instead (293 rows of 512 tokens, 156 steps, `fit-3+kd156c`): 26.54.

How: `make_scales_trainable` gives each layer an fp32 multiplier of its scales, `scale_factor` (the
only trainable tensors; optionally the norms too), and `QuantLinear.forward` takes its dequantising
path, which is differentiable in it, and caches nothing while it exists. `fold_scales` multiplies
it into the stored (fp16) scales and drops it and every packed copy, so the trained model runs and
saves exactly like the one loaded; the loop calls it before writing the artifact, which is a
GPTQ-layout folder (`save_quantized`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from qingzhou.errors import RecipeError
from qingzhou.finetune.config import FinetuneConfig

if TYPE_CHECKING:  # pragma: no cover - the config imports without torch
    from torch import nn

    from qingzhou.llm.quantized.qlinear import QuantLinear


class QuantScalesConfig(FinetuneConfig):
    method: Literal["quant_scales"] = "quant_scales"
    learning_rate: float = Field(1e-3, gt=0, description="a relative step: each scale is trained as a multiplier")
    train_norms: bool = Field(False, description="also train the RMSNorm/LayerNorm weights (they stay dense)")


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    from qingzhou.llm.quantized.qlinear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def make_scales_trainable(model: nn.Module, *, train_norms: bool = False) -> nn.Module:
    """Every `QuantLinear` gets a trainable fp32 multiplier of its scales (ones: the model is
    unchanged); everything else is frozen. A multiplier, not the scales themselves, so one learning
    rate is a relative step for every group whatever its magnitude."""
    import torch
    from torch import nn

    layers = quant_layers(model)
    if not layers:
        raise RecipeError("the model has no quantized (GPTQ-layout) layers to train the scales of.",
                          where="method", hint="Load a folder written by `qingzhou quantize` (or any GPTQ "
                                                "checkpoint), or choose another method (lora, full).")
    model.requires_grad_(False)
    for layer in layers.values():
        if layer.scale_factor is None:
            layer.clear_runtime()  # packs and cached weights would ignore the multiplier
            layer.scale_factor = nn.Parameter(torch.ones(layer.scales.shape, device=layer.scales.device))
        layer.scale_factor.requires_grad_(True)
    if train_norms:
        for name, p in model.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2].lower():
                p.requires_grad_(True)
    return model


def fold_scales(model: nn.Module) -> nn.Module:
    """Each trained multiplier into its layer's scales (their stored dtype, fp16), then dropped; packed
    copies are rebuilt from the new scales on next use."""
    import torch

    for layer in quant_layers(model).values():
        if layer.scale_factor is not None:
            with torch.no_grad():
                layer.scales.copy_(layer.scales.float() * layer.scale_factor.detach())
            layer.scale_factor = None
        layer.clear_runtime()
    return model


def save_quantized_folder(model: nn.Module, tokenizer: Any, folder: str | Path) -> None:
    """The loop's artifact writer for this method: the GPTQ-layout folder (scales already folded)."""
    from qingzhou.llm.quantized.gptq_layout import save_quantized

    save_quantized(fold_scales(model), tokenizer, folder, overwrite=True)


__all__ = ["QuantScalesConfig", "make_scales_trainable", "fold_scales", "save_quantized_folder", "quant_layers"]
