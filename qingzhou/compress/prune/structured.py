"""Structured pruning that makes a *smaller dense model*: fewer attention heads, a narrower MLP and
fewer decoder layers, with a config that plain `transformers` loads.

What is removed is chosen from calibration statistics gathered in one pass of the shared
layer-by-layer engine (weights untouched during the pass):

* **attention heads** - grouped-query attention ties every key/value head to a group of query
  heads, so the unit removed is a whole KV group (its K and V heads plus the query heads that read
  them). A group's importance is the energy it writes into the residual stream on calibration data,
  sum_t ||x_t,h W_o[:, h]^T||^2 over its query heads h (the Minitron-style activation criterion,
  computed exactly from the per-head Gram matrices of o_proj's input). HF configs hold one head
  count for all layers, so every layer loses the same number of groups (each its own weakest ones).
* **MLP channels** - channel j's importance is sum_t x_tj^2 * ||W_down[:, j]||^2 (the energy it
  writes through down_proj); every layer keeps the same number, its own strongest ones.
* **layers** - block importance is the mean angular distance arccos(cos(h_in, h_out)) / pi
  between a layer's input and output hidden states (ShortGPT / Gromov et al.): a layer that
  barely rotates the residual stream is removed first.

Supports the Llama family layout (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`): Llama,
Qwen2/2.5/3, Mistral, SmolLM, Yi, InternLM2-converted, DeepSeek dense ...; biases and Qwen3's
per-head q/k norms are handled.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, Field

from qingzhou.compress.prune.registry import register_pruner
from qingzhou.compress.settings import LayerwiseSettings

ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


class StructuredConfig(LayerwiseSettings):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    method: Literal["structured"] = "structured"
    heads: float = Field(0.0, ge=0, lt=1, description="fraction of KV groups (with their query heads) "
                                                      "removed from every layer, rounded to whole groups")
    mlp: float = Field(0.0, ge=0, lt=1, description="fraction of MLP intermediate channels removed per layer")
    mlp_multiple: int = Field(1, ge=1, description="round the kept MLP width down to a multiple of this "
                                                   "(e.g. 64 for efficient GPU shapes)")
    layers: int = Field(0, ge=0, description="number of decoder layers removed (lowest block importance)")
    drop_layers: list[int] = Field(default_factory=list, description="these decoder layers (0-based indices) "
                                   "removed, chosen by the caller (a `fit` plan); instead of `layers`")


@dataclass
class StructuredReport:
    config: dict[str, Any]
    parameters_before: int = 0
    parameters_after: int = 0
    shape_before: dict[str, int] = field(default_factory=dict)
    shape_after: dict[str, int] = field(default_factory=dict)
    removed_layers: list[int] = field(default_factory=list)
    layer_importance: list[float] = field(default_factory=list)  # angular distance per original layer
    kept_kv_groups: dict[int, list[int]] = field(default_factory=dict)  # per original layer
    head_importance: dict[int, list[float]] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def summary(self) -> dict[str, Any]:
        return {"method": "structured", "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after,
                "parameter_ratio": round(self.parameters_after / max(self.parameters_before, 1), 4),
                **{f"{k}_before": v for k, v in self.shape_before.items()},
                **{f"{k}_after": v for k, v in self.shape_after.items()},
                "removed_layers": self.removed_layers, "seconds": round(self.seconds, 2)}


def _shape(config: Any) -> dict[str, int]:
    return {"layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "intermediate": config.intermediate_size}


def _count(model: Any) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class StructureStats:
    """Engine callback gathering per-head Gram matrices of o_proj's input, per-channel input energy
    of down_proj, and each layer's input/output angular distance. Weights are not changed."""

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self.gram: dict[str, Any] = {}
        self.sq: dict[str, Any] = {}
        self.angle: dict[int, list[float]] = {}  # layer -> [sum of angles, tokens]
        self._hook = None

    def begin_layer(self, index: int, layer: Any, inputs: Any) -> None:
        import torch

        def hook(module, args, kwargs, output):
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = (output[0] if isinstance(output, (tuple, list)) else output).float()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).clamp(-1, 1)
            acc = self.angle.setdefault(index, [0.0, 0])
            acc[0] += float(torch.arccos(cos).sum() / math.pi)
            acc[1] += cos.numel()

        self._hook = layer.register_forward_hook(hook, with_kwargs=True)

    def add_batch(self, name: str, module: Any, x: Any) -> None:
        import torch

        x = x.float()
        if name.endswith("o_proj"):
            xh = x.reshape(x.shape[0], -1, self.head_dim)
            g = torch.einsum("tha,thb->hab", xh, xh)
            self.gram[name] = self.gram[name] + g if name in self.gram else g
        else:
            s = torch.sum(x * x, dim=0)
            self.sq[name] = self.sq[name] + s if name in self.sq else s

    def finish_group(self, index: int, layer: Any, modules: dict[str, Any]) -> None:
        self._unhook()  # only the collection pass is measured, not the output pass

    def end_layer(self, index: int, layer: Any) -> None:
        self._unhook()  # layers with no target linears are measured on the output pass

    def _unhook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _check_layout(layers: Any) -> None:
    from qingzhou.errors import ModelLoadError

    layer = layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in ATTN_NAMES) \
            or not all(hasattr(mlp, n) for n in MLP_NAMES):
        raise ModelLoadError(
            f"structured pruning does not know the layout of {type(layer).__name__}.",
            where="structured pruning",
            hint="Supported: Llama-family layers with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj "
                 "(Llama, Qwen2/3, Mistral, SmolLM ...).")


def _slice_linear(lin: Any, index: Any, dim: int) -> Any:
    """A new nn.Linear keeping output rows (dim=0) or input columns (dim=1) `index`."""
    import torch
    from torch import nn

    w = lin.weight.detach().index_select(dim, index.to(lin.weight.device))
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach().index_select(0, index.to(w.device)))
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def _head_scores(o_weight: Any, gram: Any, head_dim: int) -> Any:
    """Energy each query head writes through o_proj: trace(W_h G_h W_h^T)."""
    import torch

    W = o_weight.detach().float()
    heads = gram.shape[0]
    Wh = W.reshape(W.shape[0], heads, head_dim).permute(1, 0, 2)  # [heads, hidden, hd]
    return torch.einsum("hoa,hab,hob->h", Wh, gram.to(W.device), Wh)


def _prune_heads(layer: Any, keep_groups: Any, group: int, head_dim: int) -> None:
    import torch

    attn = layer.self_attn
    kv_idx = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in keep_groups.tolist()])
    q_heads = [g * group + j for g in keep_groups.tolist() for j in range(group)]
    q_idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in q_heads])
    attn.q_proj = _slice_linear(attn.q_proj, q_idx, 0)
    attn.k_proj = _slice_linear(attn.k_proj, kv_idx, 0)
    attn.v_proj = _slice_linear(attn.v_proj, kv_idx, 0)
    attn.o_proj = _slice_linear(attn.o_proj, q_idx, 1)
    for attr in ("num_heads", "num_attention_heads"):
        if hasattr(attn, attr):
            setattr(attn, attr, len(q_heads))
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = len(keep_groups)


def _prune_mlp(layer: Any, keep: Any) -> None:
    mlp = layer.mlp
    mlp.gate_proj = _slice_linear(mlp.gate_proj, keep, 0)
    mlp.up_proj = _slice_linear(mlp.up_proj, keep, 0)
    mlp.down_proj = _slice_linear(mlp.down_proj, keep, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def _drop_layers(model: Any, layers: Any, remove: list[int]) -> None:
    from torch import nn

    keep = [i for i in range(len(layers)) if i not in set(remove)]
    kept = nn.ModuleList([layers[i] for i in keep])
    parent_path = _layers_path(model)
    parent = model.get_submodule(parent_path.rsplit(".", 1)[0])
    setattr(parent, parent_path.rsplit(".", 1)[1], kept)
    for new_i, layer in enumerate(kept):  # the KV cache is indexed by layer_idx
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_i
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layers):
        cfg.layer_types = [types[i] for i in keep]


def _layers_path(model: Any) -> str:
    from qingzhou.compress.calibrate import find_decoder_layers

    return find_decoder_layers(model)[1]


@register_pruner("structured", StructuredConfig, reshapes=True)
def structured_prune(model: Any, cfg: StructuredConfig | dict[str, Any], calib: Any = None, *,
                     tokenizer: Any = None) -> StructuredReport:
    """Remove KV groups, MLP channels and whole layers from `model` in place (new, smaller
    `nn.Linear`s and an updated `model.config`); save it with `qingzhou.llm.save_model`."""
    import torch

    from qingzhou.compress.calibrate import LayerwiseOptions, find_decoder_layers, run_layerwise
    from qingzhou.compress.driver import calibration_samples
    from qingzhou.errors import RecipeError

    cfg = cfg if isinstance(cfg, StructuredConfig) else StructuredConfig.model_validate(cfg)
    t0 = time.perf_counter()
    layers, prefix = find_decoder_layers(model)
    _check_layout(layers)
    config = model.config
    report = StructuredReport(config=cfg.model_dump(mode="json"), parameters_before=_count(model),
                              shape_before=_shape(config))
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    n_kv = report.shape_before["kv_heads"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    group = n_heads // n_kv
    drop_groups = round(cfg.heads * n_kv)
    keep_channels = config.intermediate_size - round(cfg.mlp * config.intermediate_size)
    keep_channels -= keep_channels % cfg.mlp_multiple
    if drop_groups >= n_kv or keep_channels < 1 or cfg.layers >= n_layers:
        raise RecipeError(f"nothing would be left: heads={cfg.heads} of {n_kv} KV groups, mlp={cfg.mlp} of "
                          f"{config.intermediate_size} channels, layers={cfg.layers} of {n_layers}.",
                          where="structured", hint="Lower the fractions.")
    if cfg.drop_layers:
        bad = sorted({i for i in cfg.drop_layers if not 0 <= i < n_layers})
        if cfg.layers or bad or len(set(cfg.drop_layers)) != len(cfg.drop_layers) or len(cfg.drop_layers) >= n_layers:
            raise RecipeError(f"drop_layers {cfg.drop_layers} is not a set of layer indices of this model "
                              f"(0..{n_layers - 1}, each once, at least one layer left), or comes with "
                              f"layers={cfg.layers}.", where="structured drop_layers",
                              hint="Give either `layers` (how many, chosen by importance) or `drop_layers` (which).")

    stats = StructureStats(head_dim)
    if drop_groups or keep_channels < config.intermediate_size or cfg.layers:  # explicit drops measure nothing
        samples = calibration_samples(calib, cfg, tokenizer, "prune")
        targets = {f"{prefix}.{i}.self_attn.o_proj" for i in range(n_layers)} if drop_groups else set()
        targets |= {f"{prefix}.{i}.mlp.down_proj" for i in range(n_layers)} if keep_channels < config.intermediate_size else set()
        cal = run_layerwise(model, samples, stats,
                            LayerwiseOptions.from_config(cfg, targets=targets.__contains__, true_sequential=False))
        report.calibration = cal.to_dict()
        report.layer_importance = [stats.angle[i][0] / max(stats.angle[i][1], 1) if i in stats.angle else 0.0
                                   for i in range(n_layers)]

    with torch.no_grad():
        for i, layer in enumerate(layers):
            if drop_groups:
                o_name = f"{prefix}.{i}.self_attn.o_proj"
                scores = _head_scores(layer.self_attn.o_proj.weight, stats.gram.pop(o_name), head_dim)
                group_scores = scores.reshape(n_kv, group).sum(dim=1)
                keep = torch.sort(torch.topk(group_scores, n_kv - drop_groups).indices).values
                report.head_importance[i] = [float(s) for s in group_scores]
                report.kept_kv_groups[i] = keep.tolist()
                _prune_heads(layer, keep.cpu(), group, head_dim)
            if keep_channels < config.intermediate_size:
                down = layer.mlp.down_proj
                energy = stats.sq.pop(f"{prefix}.{i}.mlp.down_proj").to(down.weight.device) \
                    * down.weight.detach().float().pow(2).sum(dim=0)
                keep = torch.sort(torch.topk(energy, keep_channels).indices).values
                _prune_mlp(layer, keep.cpu())
    if drop_groups:
        config.num_attention_heads = (n_kv - drop_groups) * group
        config.num_key_value_heads = n_kv - drop_groups
        config.head_dim = head_dim  # otherwise hidden_size // heads would be recomputed on load
    config.intermediate_size = keep_channels
    if cfg.layers or cfg.drop_layers:
        order = sorted(range(n_layers), key=lambda i: report.layer_importance[i]) if cfg.layers else []
        report.removed_layers = sorted(cfg.drop_layers or order[: cfg.layers])
        _drop_layers(model, layers, report.removed_layers)
    report.parameters_after = _count(model)
    report.shape_after = _shape(model.config)
    report.seconds = time.perf_counter() - t0
    return report
