"""`moefy(model, cfg, calib)`: turn every decoder FFN into a mixture of experts (MoEfication).

One pass of the shared layer-by-layer engine over calibration data collects, per layer, the FFN's
inputs and intermediate activations on up to `max_tokens` tokens (statistics of the dense model).
Per layer: group the neurons into k equal experts by balanced k-means (on co-activation patterns
or on weights), reorder the neurons so each expert is a contiguous slice, and build the router.
Afterwards each FFN is replaced by an `MoEMLP` running the top-e experts per token. With
`cfg.evaluate` the report carries perplexity for several e (quality vs FFN compute kept, e/k).
"""
from __future__ import annotations

import re
import time
from itertools import accumulate
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qingzhou.compress.moefy.cluster import balanced_kmeans, balanced_sizes
from qingzhou.compress.moefy.config import MoefyConfig
from qingzhou.llm.moe import MLPLayout, MoEMLP, ffn_activations, mlp_layout, permute_neurons, set_top_k
from qingzhou.compress.moefy.router import centroid_router, expert_norms, routing_quality, train_router


@dataclass
class MoefyReport:
    config: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)  # per moefied FFN
    skipped: list[str] = field(default_factory=list)
    quality: list[dict[str, Any]] = field(default_factory=list)  # perplexity per top_k
    calibration: dict[str, Any] = field(default_factory=dict)
    router_parameters: int = 0
    router_flops_ratio: float = 0.0  # router multiply-adds / dense FFN multiply-adds, per token
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def summary(self) -> dict[str, Any]:
        k, e = self.config["num_experts"], self.config["top_k"]
        mean = (lambda key: round(sum(r[key] for r in self.layers) / len(self.layers), 4)) if self.layers else (lambda key: None)
        out = {"method": "moefy", "num_experts": k, "top_k": e, "router": self.config["router"],
               "cluster_on": self.config["cluster_on"], "moefied_ffns": len(self.layers),
               "ffn_compute_kept": round(e / k + self.router_flops_ratio, 4),
               "router_recall": mean("recall"), "chance_recall": round(e / k, 4),
               "mass_kept": mean("mass_kept"), "oracle_mass_kept": mean("oracle_mass_kept"),
               "seconds": round(self.seconds, 2)}
        for row in self.quality:
            out[f"ppl_top{row['top_k']}"] = row["ppl"]
        return out


def find_ffns(model: nn.Module, skip: list[str]) -> tuple[dict[str, tuple[nn.Module, MLPLayout]], list[str]]:
    """The decoder layers' FFNs (`model.layers.3.mlp` -> (module, layout)) and the skipped names."""
    from qingzhou.compress.calibrate import find_decoder_layers
    from qingzhou.errors import ModelLoadError

    layers, prefix = find_decoder_layers(model)
    found: dict[str, tuple[nn.Module, MLPLayout]] = {}
    skipped: list[str] = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        layout = mlp_layout(mlp) if mlp is not None else None
        if layout is None:
            raise ModelLoadError(
                f"cannot moefy the FFN of {type(layer).__name__} ({type(mlp).__name__ if mlp is not None else 'no .mlp'}).",
                where=f"{prefix}.{i}", hint="Supported: `mlp` with nn.Linear gate_proj/up_proj/down_proj (Llama, Qwen, "
                                            "Mistral, Gemma), fc1/fc2 (Phi), dense_h_to_4h/dense_4h_to_h (GPT-NeoX).")
        name = f"{prefix}.{i}.mlp"
        if any(re.search(p, name) for p in skip):
            skipped.append(name)
        else:
            found[name] = (mlp, layout)
    return found, skipped


class MoefyCollector:
    """Engine callback: keeps a token subsample of each FFN's input and activations, then (at the
    end of the layer) clusters the neurons, reorders them and builds the router."""

    def __init__(self, ffns: dict[str, tuple[nn.Module, MLPLayout]], cfg: MoefyConfig, total_tokens: int):
        self.ffns, self.cfg = ffns, cfg
        self.keep = min(1.0, cfg.max_tokens / max(total_tokens, 1))
        self.by_input = {f"{name}.{layout.up}": name for name, (_, layout) in ffns.items()}
        self.x: dict[str, list[torch.Tensor]] = {}
        self.acts: dict[str, list[torch.Tensor]] = {}
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.built: dict[str, tuple[list[int], nn.Module]] = {}
        self.stats: list[dict[str, Any]] = []

    def add_batch(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        ffn = self.by_input[name]
        n = max(1, round(x.shape[0] * self.keep))
        idx = torch.randperm(x.shape[0], generator=self.gen)[:n].to(x.device)
        x = x.index_select(0, idx)
        mlp, layout = self.ffns[ffn]
        self.x.setdefault(ffn, []).append(x.float())
        self.acts.setdefault(ffn, []).append(ffn_activations(mlp, layout, x))

    def finish_group(self, index: int, layer: nn.Module, modules: dict[str, nn.Linear]) -> None:
        for name in modules:
            ffn = self.by_input[name]
            with torch.no_grad():
                self._build(ffn, torch.cat(self.x.pop(ffn)), torch.cat(self.acts.pop(ffn)))

    def _build(self, ffn: str, x: torch.Tensor, acts: torch.Tensor) -> None:
        cfg = self.cfg
        mlp, layout = self.ffns[ffn]
        labels = balanced_kmeans(neuron_features(mlp, layout, acts, cfg.cluster_on), cfg.num_experts,
                                 iters=cfg.kmeans_iters, seed=cfg.seed)
        order = torch.argsort(labels, stable=True)
        permute_neurons(mlp, layout, order)
        acts = acts[:, order.to(acts.device)]
        bounds = [0, *accumulate(balanced_sizes(acts.shape[1], cfg.num_experts))]  # label i has size i
        norms = expert_norms(acts, getattr(mlp, layout.down).weight, bounds)
        if cfg.router == "centroid":
            router = centroid_router(mlp, layout, bounds)
        else:
            router = train_router(x, norms, width=cfg.router_hidden, steps=cfg.router_steps, lr=cfg.router_lr,
                                  seed=cfg.seed)
        weight = getattr(mlp, layout.up).weight
        router = router.to(device=weight.device, dtype=weight.dtype)
        quality = routing_quality(router(x.to(weight.dtype)), norms, cfg.top_k)
        self.built[ffn] = (bounds, router)
        self.stats.append({"ffn": ffn, "widths": [b - a for a, b in zip(bounds[:-1], bounds[1:])],
                           "tokens": x.shape[0], **{k: round(v, 4) for k, v in quality.items()}})


def neuron_features(mlp: nn.Module, layout: MLPLayout, acts: torch.Tensor, cluster_on: str) -> torch.Tensor:
    """What k-means compares neurons by: their activation magnitude on each calibration token
    (tokens normalised to unit norm first, so a few huge-norm tokens do not decide every group),
    or their input weight vectors (gate and up rows side by side)."""
    if cluster_on == "weights":
        rows = [getattr(mlp, n).weight.detach().float() for n in (layout.gate, layout.up) if n]
        return torch.cat(rows, dim=1)
    a = acts.abs()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a.T


def moefy(model: nn.Module, cfg: MoefyConfig | dict[str, Any], calib: Any = None, *,
          tokenizer: Any = None, output_dir: str | Path | None = None, overwrite: bool = False) -> MoefyReport:
    """MoEfy every decoder FFN of `model` in place and report routing and (optionally) quality.

    `calib`: calibration samples (token tensors, an [N, T] tensor, strings, or None to load
    `cfg.calibration` with `tokenizer`). The model keeps its architecture's weights (neurons
    reordered), so `save_moefied` writes a folder plain transformers loads as the dense model, plus
    the partition and routers that `apply_moefication` re-applies. `set_top_k(model, e)` changes the
    experts per token afterwards. Given `output_dir`, the model is saved there (`save_moefied`) with
    `metrics.json` and `report.json`, as every verb saves.
    """
    from qingzhou.compress.calibrate import LayerwiseOptions, run_layerwise
    from qingzhou.data.calibration import calibration_samples

    cfg = cfg if isinstance(cfg, MoefyConfig) else MoefyConfig.model_validate(cfg)
    t0 = time.perf_counter()
    ffns, skipped = find_ffns(model, cfg.skip)
    samples = calibration_samples(calib, cfg.calibration, tokenizer, method="moefy", where="moefy")
    collector = MoefyCollector(ffns, cfg, sum(s.numel() for s in samples))
    cal = run_layerwise(model, samples, collector,
                        LayerwiseOptions.from_config(cfg, targets=collector.by_input.__contains__))
    report = MoefyReport(config=cfg.model_dump(mode="json"), skipped=skipped, calibration=cal.to_dict(),
                         layers=collector.stats)
    ratios = []
    for name, (bounds, router) in collector.built.items():
        mlp, layout = ffns[name]
        model.set_submodule(name, MoEMLP(mlp, layout, bounds, router, cfg.top_k))
        params = sum(p.numel() for p in router.parameters())  # multiply-adds per token, like the FFN's
        report.router_parameters += params
        ratios.append(params / sum(getattr(mlp, n).weight.numel() for n in layout.names))
    report.router_flops_ratio = sum(ratios) / len(ratios) if ratios else 0.0
    if cfg.evaluate is not None:
        report.quality = quality_table(model, tokenizer, cfg)
    report.seconds = time.perf_counter() - t0
    if output_dir is not None:
        from qingzhou.compress.driver import write_outputs
        from qingzhou.compress.moefy.saving import save_moefied

        write_outputs(output_dir, report, lambda folder: save_moefied(model, tokenizer, folder, overwrite=overwrite))
    return report


def quality_table(model: nn.Module, tokenizer: Any, cfg: MoefyConfig) -> list[dict[str, Any]]:
    """Perplexity for each experts-per-token count of `cfg.sweep()` (e == k is the dense model)."""
    from qingzhou.data.corpus import load_text
    from qingzhou.errors import DataError
    from qingzhou.eval.perplexity import perplexity

    assert cfg.evaluate is not None
    if tokenizer is None:
        raise DataError("the moefy quality table needs a tokenizer.", where="moefy.evaluate",
                        hint="Pass tokenizer= or drop `evaluate`.")
    text = load_text(cfg.evaluate.text)
    rows = []
    try:
        for e in cfg.sweep():
            set_top_k(model, e)
            res = perplexity(model, tokenizer, text, seq_len=cfg.evaluate.seq_len,
                             max_windows=cfg.evaluate.max_windows, progress=False)
            rows.append({"top_k": e, "num_experts": cfg.num_experts,
                         "ffn_compute_kept": round(e / cfg.num_experts, 4), "ppl": round(res.ppl, 4),
                         "tokens": res.tokens, "seconds": round(res.seconds, 2)})
    finally:
        set_top_k(model, cfg.top_k)
    return rows
