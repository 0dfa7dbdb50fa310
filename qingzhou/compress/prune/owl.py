"""OWL (Yin et al. 2024): outlier-weighted layerwise sparsity.

Uniform sparsity over-prunes the layers that hold most of an LLM's outlier features. OWL counts,
per decoder layer, the fraction of Wanda scores (|W| * ||X||) above `threshold` x the layer's mean
score on the *dense* model, then maps the ratios linearly onto [-spread, +spread] around the
global density: layers with more outliers keep more weights, and the mean sparsity is unchanged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qingzhou.compress.prune.wanda import InputNorms

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from qingzhou.compress.prune.config import CalibratedPruneConfig, OWLConfig
    from qingzhou.compress.prune.masks import Target


class OutlierCounter(InputNorms):
    """Engine callback (weights untouched): outlier ratio of each layer's Wanda scores."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.ratios: dict[int, float] = {}

    def finish_group(self, index: int, layer: nn.Module, modules: dict[str, nn.Linear]) -> None:
        import torch

        from qingzhou.compress.prune.wanda import wanda_scores

        scores = [wanda_scores(m.weight, self.sq.pop(n)).reshape(-1) for n, m in modules.items() if n in self.sq]
        if not scores:
            return
        flat = torch.cat(scores)
        self.ratios[index] = float((flat > self.threshold * flat.mean()).float().mean())


def outlier_ratios(model: nn.Module, plan: dict[str, Target], samples: Any, cfg: CalibratedPruneConfig,
                   owl: OWLConfig) -> dict[int, float]:
    """Per decoder layer, the fraction of outlier scores (one calibration pass, weights untouched)."""
    from qingzhou.compress.calibrate import LayerwiseOptions, run_layerwise

    counter = OutlierCounter(owl.threshold)
    run_layerwise(model, samples, counter,
                  LayerwiseOptions.from_config(cfg, targets=plan.__contains__, true_sequential=False))
    return counter.ratios


def owl_sparsities(ratios: dict[int, float], sparsity: float, spread: float) -> dict[int, float]:
    """OWL's mapping: min-max scale the ratios to [0, 2*spread], centre on the global density."""
    if not ratios:
        return {}
    lo, hi = min(ratios.values()), max(ratios.values())
    if hi - lo <= 0:
        return dict.fromkeys(ratios, sparsity)
    scaled = {i: (r - lo) / (hi - lo) * 2 * spread for i, r in ratios.items()}
    mean = sum(scaled.values()) / len(scaled)
    density = {i: s - mean + (1 - sparsity) for i, s in scaled.items()}
    return {i: min(max(1 - d, 0.0), 0.99) for i, d in density.items()}
