"""Per-input-channel scaling that leaves a decoder layer's function unchanged (AWQ, SmoothQuant).

Both methods multiply the input columns of some linears by `s` and divide the output of the
operation that feeds them by the same `s`, so `prev(x) @ W.T == (prev(x) / s) @ (W * s).T` holds
exactly. Where the division can be folded is architecture knowledge; for the Llama family (Llama,
Qwen2/3, Mistral, Yi, InternLM2-as-Llama, DeepSeek dense ...) it is AutoAWQ's table:

* `input_layernorm`          -> q_proj, k_proj, v_proj
* `self_attn.v_proj`         -> o_proj        (only when v's outputs are o's inputs: no GQA)
* `post_attention_layernorm` -> gate_proj, up_proj
* `mlp.up_proj`              -> down_proj     (act(gate) * up is linear in up)

RMSNorm variants whose weight enters as `(1 + w)` (Gemma) cannot take a folded division, so such
layers get no scaling rather than a silently wrong model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# (feeding op, consumers) inside one decoder layer, as relative module names.
LLAMA_SCALE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one tensor, and the op whose output (= their input) can absorb 1/s."""

    prev: str
    linears: tuple[str, ...]


def scale_groups(layer: nn.Module, rules=LLAMA_SCALE_GROUPS) -> list[ScaleGroup]:
    """The groups of `rules` that this layer has and can fold; [] for unsupported layouts."""
    modules = dict(layer.named_modules())
    groups = []
    for prev, linears in rules:
        if prev not in modules or not all(n in modules for n in linears):
            continue
        p = modules[prev]
        consumers = [modules[n] for n in linears]
        width = consumers[0].in_features
        if not all(isinstance(c, nn.Linear) and c.in_features == width for c in consumers):
            continue
        if isinstance(p, nn.Linear):
            if p.out_features != width:  # e.g. GQA: v_proj's outputs are repeated before o_proj
                continue
        elif not _is_foldable_norm(p, width):
            continue
        groups.append(ScaleGroup(prev, tuple(linears)))
    return groups


def _is_foldable_norm(norm: nn.Module, width: int) -> bool:
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != (width,):
        return False
    return "gemma" not in type(norm).__name__.lower()  # Gemma: y = x_hat * (1 + w)


@torch.no_grad()
def fold_scales(layer: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide `group.prev`'s output by `s` and multiply the consumers' input columns by `s`."""
    modules = dict(layer.named_modules())
    prev = modules[group.prev]
    s = s.detach().float()
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias))
    else:
        prev.weight.div_(s.to(prev.weight))
        if getattr(prev, "bias", None) is not None:  # LayerNorm-style bias
            prev.bias.div_(s.to(prev.bias))
    for name in group.linears:
        lin = modules[name]
        lin.weight.mul_(s.to(lin.weight)[None, :])


@torch.no_grad()
def observe_inputs(layer: nn.Module, names: list[str], inputs: list,
                   observe: Callable[[str, torch.Tensor], None]) -> None:
    """Run `layer` on every cached `LayerBatch` and call `observe(name, x [tokens, in])` with the
    input of each named linear: the statistics pass both scaling methods need before folding."""
    modules = dict(layer.named_modules())
    device = next(layer.parameters()).device

    def make_hook(name: str):
        def hook(mod, args):
            observe(name, args[0].detach().reshape(-1, args[0].shape[-1]).float())
        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        for batch in inputs:
            b = batch.to(device)
            layer(b.hidden, **b.kwargs)
    finally:
        for h in handles:
            h.remove()
