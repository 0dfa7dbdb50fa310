"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

The input-norm factor keeps weights that multiply large activations (LLMs have a few huge
feature dimensions), which plain magnitude pruning destroys. No weight update, one forward pass
per layer: the cheapest calibrated pruner. Statistics come from the shared layer-by-layer engine,
so each layer sees the inputs produced by the already-pruned earlier layers (as in the reference).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from qingzhou.compress.prune.config import CalibratedPruneConfig
from qingzhou.compress.prune.registry import register_pruner

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from qingzhou.compress.prune.masks import Target


class WandaConfig(CalibratedPruneConfig):
    method: Literal["wanda"] = "wanda"
    comparison: Literal["row", "layer"] = Field("row", description="per output row (the paper's choice, "
                                                                   "clearly better on LLMs) or whole matrix")


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, where `input_sq_sum[j]` = sum over tokens of x_j^2."""
    return weight.detach().float().abs() * input_sq_sum.float().clamp(min=0).sqrt().to(weight.device)[None, :]


def wanda_prune_weight(weight: torch.Tensor, input_sq_sum: torch.Tensor, target: Target, *,
                       per_row: bool = True) -> torch.Tensor:
    """Mask (True = removed) for one [out, in] weight given its inputs' per-channel squared norms."""
    from qingzhou.compress.prune.masks import select_mask

    return select_mask(wanda_scores(weight, input_sq_sum), target, per_row=per_row)


class InputNorms:
    """Engine callback that only accumulates sum_t x_tj^2 per linear (shared with OWL)."""

    def __init__(self) -> None:
        self.sq: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add_batch(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        import torch

        s = torch.sum(x.float() ** 2, dim=0)
        if name in self.sq:
            self.sq[name] += s
        else:
            self.sq[name] = s
        self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]


class WandaCollector(InputNorms):
    def __init__(self, plan: dict[str, Target], per_row: bool):
        super().__init__()
        self.plan, self.per_row = plan, per_row
        self.results: dict[str, dict[str, Any]] = {}

    def finish_group(self, index: int, layer: nn.Module, modules: dict[str, nn.Linear]) -> None:
        import torch

        from qingzhou.compress.prune.magnitude import magnitude_prune_weight

        with torch.no_grad():
            for name, module in modules.items():
                w = module.weight
                sq = self.sq.pop(name, None)
                if sq is None:
                    warnings.warn(f"{name}: no calibration tokens reached it; pruned by magnitude", stacklevel=2)
                    mask = magnitude_prune_weight(w, self.plan[name], per_row=self.per_row)
                    self.results[name] = {"fallback": "magnitude"}
                else:
                    mask = wanda_prune_weight(w, sq, self.plan[name], per_row=self.per_row)
                    self.results[name] = {"tokens": self.tokens.get(name, 0)}
                w.masked_fill_(mask.to(w.device), 0)


@register_pruner("wanda", WandaConfig)
def run_wanda(model: nn.Module, cfg: WandaConfig, plan: dict[str, Target], calib: Any) -> dict[str, Any]:
    from qingzhou.compress.calibrate import LayerwiseOptions, run_layerwise

    collector = WandaCollector(plan, per_row=cfg.comparison == "row")
    report = run_layerwise(model, calib, collector, LayerwiseOptions.from_config(cfg, targets=plan.__contains__))
    return {"modules": collector.results, "calibration": report.to_dict()}
