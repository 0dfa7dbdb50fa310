"""A SwiGLU MLP `down(silu(gate(x)) * up(x))` as one autograd op that keeps only x, gate and up.

Why: op by op, autograd keeps four intermediate-size tensors per token and layer for a Llama MLP's
backward: `gate` (for silu), `silu(gate)` and `up` (for the product) and the product itself (the
input of `down_proj`, for its weight or LoRA gradient). The last two are an elementwise function of
the first two, so this op saves `gate` and `up` only and rebuilds `silu(gate)` and the product in
backward: for SmolLM2 at 2 x 512 tokens that is about 0.38 GB less per step, at the price of one
sigmoid and two products over (tokens x intermediate), small beside the MLP's three matmuls.

Each projection is either a plain `nn.Linear` (trainable or frozen: full fine-tuning, frozen
layers) or a peft LoRA linear in the plain state `fused_lora` accepts (scale folded into the thin
factor, as there; its base dense or bitsandbytes 4-bit, QLoRA). Anything else (another quantized
base, DoRA, LoRA dropout, autocast, mixed dtypes) takes the module's own forward. Same values and gradients as the stock modules (tested).

Training only: `fused_mlps(model)` patches the covered MLP *instances* and restores them on exit;
it is entered by the loop through `fused_training_ops`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}

_FUNC: list[Any] = []


def _function() -> Any:
    if _FUNC:
        return _FUNC[0]
    import torch
    import torch.nn.functional as F

    from qingzhou.finetune.fused_lora import add_input_grad, base_product

    def project(x2: Any, w: Any, bias: Any, a: Any, b: Any, scaling: float, q4: Any) -> tuple[Any, Any]:
        """x W^T + bias (+ s (x A^T) B^T): the output and the thin LoRA factor (None without LoRA)."""
        out = base_product(x2, w, bias, q4)
        if a is None:
            return out, None
        xa = F.linear(x2, a).mul_(scaling)
        out.addmm_(xa, b.t())
        return out, xa

    def project_backward(g: Any, inp: Any, xa: Any, w: Any, a: Any, b: Any, scaling: float, q4: Any,
                         needs: tuple[bool, ...], gx: Any) -> tuple[Any, ...]:
        """Gradients of one projection given its output gradient `g`; the input gradient is added into
        `gx` (or returned new when `gx` is None). needs = (x, weight, bias, A, B)."""
        need_x, need_w, need_bias, need_a, need_b = needs
        gb_in = (g @ b).mul_(scaling) if a is not None and (need_x or need_a) else None
        if need_x:
            gx = add_input_grad(gx, g, w, q4)
            if gb_in is not None:
                gx.addmm_(gb_in, a)
        gw = g.t() @ inp if need_w else None
        gbias = g.sum(0) if need_bias else None
        ga = gb_in.t() @ inp if need_a and gb_in is not None else None
        gbb = g.t() @ xa if need_b and xa is not None else None
        return gx, gw, gbias, ga, gbb

    class SwiGLUMLP(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, wg: Any, bg: Any, ag: Any, bgl: Any, wu: Any, bu: Any, au: Any, bul: Any,
                    wd: Any, bd: Any, ad: Any, bdl: Any, sg: float, su: float, sd: float, q4s: tuple) -> Any:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            gate, xag = project(x2, wg, bg, ag, bgl, sg, q4s[0])
            up, xau = project(x2, wu, bu, au, bul, su, q4s[1])
            h = F.silu(gate).mul_(up)
            out, xad = project(h, wd, bd, ad, bdl, sd, q4s[2])
            ctx.save_for_backward(x2, gate, up, xag, xau, xad, wg, ag, bgl, wu, au, bul, wd, ad, bdl)
            ctx.scales, ctx.shape, ctx.q4s = (sg, su, sd), shape, q4s
            return out.view(*shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, ...]:
            x2, gate, up, xag, xau, xad, wg, ag, bgl, wu, au, bul, wd, ad, bdl = ctx.saved_tensors
            sg, su, sd = ctx.scales
            n = ctx.needs_input_grad
            g = grad.reshape(-1, grad.shape[-1])
            sig = torch.sigmoid(gate)
            silu = gate * sig
            h = silu * up
            # down projection: its input gradient gh (tokens x intermediate) is always needed below
            q4g, q4u, q4d = ctx.q4s
            gh, gwd, gbd, gad, gbdl = project_backward(g, h, xad, wd, ad, bdl, sd, q4d, (True, *n[9:13]), None)
            del h
            g_up = gh * silu
            del silu
            # d silu / d gate = sig * (1 + gate * (1 - sig)); built in place in `sig`'s complement
            g_gate = torch.rsub(sig, 1).mul_(gate).add_(1).mul_(sig).mul_(up).mul_(gh)
            del sig, gh
            gx, gwg, gbg, gag, gbgl = project_backward(g_gate, x2, xag, wg, ag, bgl, sg, q4g, n[0:5], None)
            gx, gwu, gbu, gau, gbul = project_backward(g_up, x2, xau, wu, au, bul, su, q4u, (n[0], *n[5:9]), gx)
            if gx is not None:
                gx = gx.view(ctx.shape)
            return (gx, gwg, gbg, gag, gbgl, gwu, gbu, gau, gbul, gwd, gbd, gad, gbdl, None, None, None, None)

    _FUNC.append(SwiGLUMLP.apply)
    return _FUNC[0]


def _silu_act(module: Any) -> bool:
    import torch

    act = getattr(module, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in {"SiLUActivation", "SiLU"}


def covered(module: Any) -> bool:
    """A module whose forward is exactly `down(silu(gate(x)) * up(x))`."""
    return (type(module).__name__ in MLP_CLASSES and _silu_act(module)
            and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")))


def _parts(layer: Any, x: Any) -> tuple[Any, Any, Any, Any, float, Any] | None:
    """(weight, bias, A, B, scaling, frozen 4-bit base) of a projection this op can run, else None.
    A 4-bit base (QLoRA) has weight None: its products go through `fused_lora.Frozen4bit`."""
    import torch

    from qingzhou.finetune.fused_lora import lora_linear_classes, plain_state

    if type(layer) is torch.nn.Linear:
        if layer.weight.dtype != x.dtype:
            return None
        return layer.weight, layer.bias, None, None, 1.0, None
    if type(layer) in lora_linear_classes():
        state = plain_state(layer, x, (), {})
        if state is None:
            return None
        name, q4 = state
        base = layer.base_layer
        return (None if q4 else base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                float(layer.scaling[name]), q4)
    return None


def _forward(module: Any, fallback: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def forward(x: Any) -> Any:
        import torch

        parts = [_parts(p, x) for p in (module.gate_proj, module.up_proj, module.down_proj)]
        if any(p is None for p in parts) or torch.is_autocast_enabled(x.device.type):
            return fallback(x)
        (wg, bg, ag, bgl, sg, qg), (wu, bu, au, bul, su, qu), (wd, bd, ad, bdl, sd, qd) = parts
        return _function()(x, wg, bg, ag, bgl, wu, bu, au, bul, wd, bd, ad, bdl, sg, su, sd, (qg, qu, qd))

    return forward


@contextlib.contextmanager
def fused_mlps(model: Any, fallbacks: dict[int, Callable[[Any], Any]] | None = None,
               enabled: bool = True) -> Iterator[int]:
    """Inside, covered MLPs of `model` run as one op when their projections allow; yields how many were
    patched. `fallbacks` maps id(module) to the forward used when a call cannot fuse (default: the
    class's own)."""
    import types

    fallbacks = fallbacks or {}
    mlps = [m for m in model.modules() if covered(m) and "forward" not in m.__dict__] if enabled else []
    for m in mlps:
        m.forward = _forward(m, fallbacks.get(id(m)) or types.MethodType(type(m).forward, m))
    try:
        yield len(mlps)
    finally:
        for m in mlps:
            m.__dict__.pop("forward", None)
