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

from dataclasses import dataclass
from typing import Any

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


def run_scaling(model: nn.Module, cfg: Any, plan: dict[str, Any], calib: Any, collector: Any, *,
                quantize_weights: bool) -> Any:
    """Walk the layers for a scaling method (AWQ, SmoothQuant) with the shared engine.

    The collector takes its statistics in the engine's observation pass (`inputs_to_observe`)
    and folds scales in `begin_layer`; with `quantize_weights` the planned linears are then handed
    to it group by group, without, none are (only the scaling runs, the model keeps its function).
    """
    from qingzhou.compress.calibrate import LayerwiseOptions, find_decoder_layers, run_layerwise

    collector.layers_path = find_decoder_layers(model)[1]
    targets = plan.__contains__ if quantize_weights else _nothing
    return run_layerwise(model, calib, collector, LayerwiseOptions.from_config(cfg, targets=targets))


def scale_only(model: nn.Module, cfg: Any, calib: Any, make_collector: Any) -> Any:
    """Only the scaling of a method (AWQ's `awq_scale`, SmoothQuant's `smooth`): the float model keeps
    its function. `make_collector(plan, cfg)` builds the method's callback, which is returned."""
    from qingzhou.compress.quantize.plan import build_plan

    plan, _ = build_plan(model, cfg)
    collector = make_collector(plan, cfg)
    run_scaling(model, cfg, plan, calib, collector, quantize_weights=False)
    return collector


def _nothing(name: str) -> bool:
    return False
