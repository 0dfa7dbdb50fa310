"""LoRA linear as one autograd op: `x W^T + b + s (x A^T) B^T`, the adapter product added in place.

Why: peft's LoRA forward is `result + lora_B(lora_A(dropout(x))) * scaling`: besides the two thin
matmuls it builds three output-sized tensors (B's product, its scaled copy, the sum) and backward
builds two more (the scaled gradient, the summed input gradient). On CPU those element-wise passes
over (tokens x out_features) add up across the 7 x layers adapted linears of a step. Here the
scale is folded into the thin (tokens x r) factor and the adapter product is accumulated into the
base output with one `addmm_`; backward does the same for the input gradient. Same values and
gradients as peft (tested), nothing more is saved than autograd would save.

Used for training only (`fused_lora_linears`, entered by the loop through `fused_training_ops`):
only peft `lora.Linear` layers in the plain state take it (one active adapter, no dropout, no
DoRA/other variant, not merged, a plain `nn.Linear` base, adapters enabled); any other call falls
back to peft's own forward, and the instances are restored on exit.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_FUNC: list[Any] = []


def _function() -> Any:
    if _FUNC:
        return _FUNC[0]
    import torch
    import torch.nn.functional as F

    class LoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any, a: Any, b: Any, scaling: float) -> Any:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            xa = F.linear(x2, a).mul_(scaling)  # (N, r), scale folded into the thin factor
            out = F.linear(x2, weight, bias)
            out.addmm_(xa, b.t())
            ctx.save_for_backward(x2, xa, weight, a, b)
            ctx.scaling, ctx.shape, ctx.has_bias = scaling, shape, bias is not None
            return out.view(*shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, ...]:
            x2, xa, weight, a, b = ctx.saved_tensors
            g = grad.reshape(-1, grad.shape[-1])
            need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
            gb_in = (g @ b).mul_(ctx.scaling) if (need_x or need_a) else None  # (N, r): dL/d(x A^T)
            gx = gw = gbias = ga = gbb = None
            if need_x:
                gx = (g @ weight).addmm_(gb_in, a).view(ctx.shape)
            if need_w:
                gw = g.t() @ x2
            if need_bias and ctx.has_bias:
                gbias = g.sum(0)
            if need_a:
                ga = gb_in.t() @ x2
            if need_b:
                gbb = g.t() @ xa
            return gx, gw, gbias, ga, gbb, None

    _FUNC.append(LoraLinear)
    return LoraLinear


def plain_state(layer: Any, x: Any, args: tuple, kwargs: dict) -> str | None:
    """The active adapter when `layer` is a plain LoRA linear this call can fuse, else None."""
    import torch

    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if type(layer.base_layer) is not torch.nn.Linear or not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    a, base = layer.lora_A[name].weight, layer.base_layer.weight
    if x.dtype != a.dtype or x.dtype != base.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    return name


def _forward(layer: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    name = plain_state(layer, x, args, kwargs)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    return _function().apply(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                             float(layer.scaling[name]))


def lora_linear_class() -> type | None:
    """peft's LoRA `Linear` class (None without peft)."""
    try:
        from peft.tuners.lora import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return Linear


def _lora_linears(model: Any) -> list[Any]:
    cls = lora_linear_class()
    return [] if cls is None else [m for m in model.modules() if type(m) is cls]


@contextlib.contextmanager
def fused_lora_linears(model: Any, enabled: bool = True) -> Iterator[int]:
    """Inside, peft LoRA linears of `model` run as one fused op when they can; yields how many were patched."""
    import types

    layers = [m for m in _lora_linears(model) if "forward" not in m.__dict__] if enabled else []
    for m in layers:
        m.forward = types.MethodType(_forward, m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
