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


class Frozen4bit:
    """A frozen bitsandbytes 4-bit base weight inside a fused op (QLoRA): its output product and
    input gradient computed the way bitsandbytes' own `matmul_4bit` computes them, the dense weight
    only ever a transient of one product."""

    def __init__(self, layer: Any) -> None:
        self.weight, self.state = layer.weight, layer.weight.quant_state

    def linear(self, x2: Any, bias: Any) -> Any:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x2, self.weight, bias=bias, quant_state=self.state)

    def dense(self, dtype: Any) -> Any:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.weight.data.view(-1, 1), self.state).to(dtype)


def frozen_4bit(base: Any, x: Any) -> Frozen4bit | None:
    """`Frozen4bit` of a bitsandbytes `Linear4bit` base that computes in `x`'s dtype, else None."""
    if type(base).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4") or \
            not type(base).__module__.startswith("bitsandbytes"):
        return None
    state = getattr(base.weight, "quant_state", None)
    if state is None or base.weight.requires_grad or getattr(base, "compute_dtype", None) not in (None, x.dtype):
        return None
    if base.bias is not None and base.bias.dtype != x.dtype:
        return None
    return Frozen4bit(base)


def base_product(x2: Any, weight: Any, bias: Any, q4: Frozen4bit | None) -> Any:
    """x W^T + b for a dense weight or a frozen 4-bit one."""
    import torch.nn.functional as F

    return q4.linear(x2, bias) if q4 is not None else F.linear(x2, weight, bias)


def add_input_grad(gx: Any, g: Any, weight: Any, q4: Frozen4bit | None) -> Any:
    """gx + g W (a new tensor when gx is None) for a dense weight or a frozen 4-bit one."""
    w = q4.dense(g.dtype) if q4 is not None else weight
    return g @ w if gx is None else gx.addmm_(g, w)


def _function() -> Any:
    if _FUNC:
        return _FUNC[0]
    import torch
    import torch.nn.functional as F

    class LoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any, a: Any, b: Any, scaling: float,
                    q4: Frozen4bit | None) -> Any:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            xa = F.linear(x2, a).mul_(scaling)  # (N, r), scale folded into the thin factor
            out = base_product(x2, weight, bias, q4)
            out.addmm_(xa, b.t())
            ctx.save_for_backward(x2, xa, weight, a, b)
            ctx.scaling, ctx.shape, ctx.has_bias, ctx.q4 = scaling, shape, bias is not None, q4
            return out.view(*shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, ...]:
            x2, xa, weight, a, b = ctx.saved_tensors
            g = grad.reshape(-1, grad.shape[-1])
            need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
            gb_in = (g @ b).mul_(ctx.scaling) if (need_x or need_a) else None  # (N, r): dL/d(x A^T)
            gx = gw = gbias = ga = gbb = None
            if need_x:
                gx = add_input_grad(None, g, weight, ctx.q4).addmm_(gb_in, a).view(ctx.shape)
            if need_w:
                gw = g.t() @ x2
            if need_bias and ctx.has_bias:
                gbias = g.sum(0)
            if need_a:
                ga = gb_in.t() @ x2
            if need_b:
                gbb = g.t() @ xa
            return gx, gw, gbias, ga, gbb, None, None

    _FUNC.append(LoraLinear)
    return LoraLinear


def plain_state(layer: Any, x: Any, args: tuple, kwargs: dict) -> tuple[str, Frozen4bit | None] | None:
    """(active adapter, its frozen 4-bit base or None for a dense one) when `layer` is a plain LoRA
    linear this call can fuse, else None."""
    import torch

    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    base = layer.base_layer
    a = layer.lora_A[name].weight
    if x.dtype != a.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    if type(base) is torch.nn.Linear:
        return (name, None) if base.weight.dtype == x.dtype else None
    q4 = frozen_4bit(base, x)
    return (name, q4) if q4 is not None else None


def _forward(layer: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    state = plain_state(layer, x, args, kwargs)
    if state is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    name, q4 = state
    base = layer.base_layer
    return _function().apply(x, None if q4 else base.weight, base.bias, layer.lora_A[name].weight,
                             layer.lora_B[name].weight, float(layer.scaling[name]), q4)


def lora_linear_classes() -> tuple[type, ...]:
    """peft's LoRA layer classes over a dense and over a bitsandbytes 4-bit base (those importable)."""
    classes = []
    try:
        from peft.tuners.lora import Linear

        classes.append(Linear)
        from peft.tuners.lora.bnb import Linear4bit

        classes.append(Linear4bit)
    except ImportError:  # peft is a dependency; its bnb layers exist only with bitsandbytes
        pass
    return tuple(classes)


def _lora_linears(model: Any) -> list[Any]:
    classes = lora_linear_classes()
    return [m for m in model.modules() if type(m) in classes]


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
