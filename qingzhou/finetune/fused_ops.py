"""Training-time SwiGLU and RMSNorm that keep fewer activations for backward (Liger-style, pure torch).

Why: with autograd's op-by-op graph, a Llama MLP keeps `silu(gate)` beside `gate` and `up`, and an
RMSNorm keeps its normalised input beside the input, although both are cheap to recompute. Per
token and layer that is one intermediate-size and two hidden-size tensors: for SmolLM2 at 4 x 512
tokens about 0.6 GB of a training step's activations. These functions save only what backward
cannot recompute cheaply (gate, up; input and 1/rms) and rebuild the rest, giving the same values
and gradients (tested against the stock modules).

Opt-in (`fused_ops: true` in the fine-tuning config): on CPU the extra elementwise work of the
recomputation measured about 15% slower steps on a tiny Llama, so memory-bound users choose it.
They are patched onto module *instances* for the duration of training (`fused_training_ops`) and
removed afterwards, so the model handed back is untouched. Only the classes listed here are
patched: their forward is exactly `down(silu(gate(x)) * up(x))` and `w * (x / rms(x))`; any other
architecture (Gemma's `1 + w` norm, GELU MLPs, ...) keeps its own code.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from qingzhou.finetune.fused_mlp import covered

RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}

_FUNCS: dict[str, Any] = {}


def _functions() -> dict[str, Any]:
    if _FUNCS:
        return _FUNCS
    import torch

    class SwiGLU(torch.autograd.Function):
        """silu(gate) * up, saving gate and up only."""

        @staticmethod
        def forward(ctx: Any, gate: Any, up: Any) -> Any:
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, Any]:
            gate, up = ctx.saved_tensors
            sig = torch.sigmoid(gate)
            silu = gate * sig
            d_up = grad * silu
            # d silu / d gate = sig * (1 + gate * (1 - sig)) = sig + silu * (1 - sig)
            d_gate = grad * up * (sig + silu * (1 - sig))
            return d_gate, d_up

    class RMSNorm(torch.autograd.Function):
        """weight * (x / sqrt(mean(x^2) + eps)) in fp32, cast like the stock module; saves x and 1/rms."""

        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, eps: float) -> Any:
            x32 = x.float()
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, weight, rstd)
            return weight * (x32 * rstd).to(x.dtype)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, Any, None]:
            x, weight, rstd = ctx.saved_tensors
            xhat = x.float() * rstd
            d_weight = (grad.float() * xhat.to(x.dtype).float()).sum(dim=tuple(range(grad.dim() - 1))).to(weight.dtype)
            g = (grad * weight).float()
            d_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
            return d_x.to(x.dtype), d_weight, None

    _FUNCS.update(swiglu=SwiGLU.apply, rmsnorm=RMSNorm.apply)
    return _FUNCS


def _mlp_forward(module: Any) -> Any:
    swiglu = _functions()["swiglu"]
    return lambda x: module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x)))


def _norm_forward(module: Any) -> Any:
    rmsnorm = _functions()["rmsnorm"]
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    return lambda x: rmsnorm(x, module.weight, eps)


def patchable(model: Any) -> list[tuple[Any, Any]]:
    """(module, replacement forward) for every module these fused ops cover."""
    out = []
    for module in model.modules():
        name = type(module).__name__
        if covered(module):
            out.append((module, _mlp_forward(module)))
        elif name in RMSNORM_CLASSES and getattr(module, "weight", None) is not None:
            out.append((module, _norm_forward(module)))
    return out


@contextlib.contextmanager
def fused_training_ops(model: Any, enabled: bool = True) -> Iterator[int]:
    """Patch the covered modules' forwards while training; yields how many were patched.

    Whatever `enabled` says, the exact speed-ups that change no value are on too: per-sample attention
    over packed rows (`packed_attention`), peft LoRA linears as one fused op (`fused_lora`) and Llama
    MLPs as one op keeping only gate and up (`fused_mlp`). `enabled` gates the recomputing
    SwiGLU/RMSNorm above; the SwiGLU is then what an MLP the fused op cannot take falls back to."""
    from qingzhou.finetune.fused_lora import fused_lora_linears
    from qingzhou.finetune.fused_mlp import fused_mlps
    from qingzhou.finetune.packed_attention import packed_attention

    chosen = [] if not enabled else [(m, fwd) for m, fwd in patchable(model) if "forward" not in m.__dict__]
    fallbacks = {id(m): fwd for m, fwd in chosen if covered(m)}
    patched = [(m, fwd) for m, fwd in chosen if id(m) not in fallbacks]
    for module, fwd in patched:
        module.forward = fwd
    try:
        with packed_attention(model), fused_lora_linears(model), fused_mlps(model, fallbacks):
            yield len(chosen)
    finally:
        for module, _ in patched:
            module.__dict__.pop("forward", None)
