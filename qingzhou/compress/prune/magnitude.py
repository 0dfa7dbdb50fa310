"""Magnitude pruning: remove the smallest |W|. The data-free baseline every paper compares with.

The comparison group defaults to the whole matrix (`layer`), as in the SparseGPT and Wanda
baselines; `row` gives every output row the same sparsity.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from qingzhou.compress.prune.config import CalibratedPruneConfig
from qingzhou.compress.prune.registry import register_pruner

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from qingzhou.compress.prune.masks import Target


class MagnitudeConfig(CalibratedPruneConfig):
    """Calibration settings are only used with `owl` (which needs activations to rank layers)."""

    method: Literal["magnitude"] = "magnitude"
    comparison: Literal["layer", "row"] = Field("layer", description="group within which the smallest "
                                                                     "weights are removed (unstructured)")


def magnitude_prune_weight(weight: Any, target: Target, *, per_row: bool = False) -> Any:
    """Mask (True = removed) of the smallest-magnitude weights of one [out, in] matrix."""
    from qingzhou.compress.prune.masks import select_mask

    return select_mask(weight.detach().float().abs(), target, per_row=per_row)


@register_pruner("magnitude", MagnitudeConfig, needs_calibration=False)
def run_magnitude(model: nn.Module, cfg: MagnitudeConfig, plan: dict[str, Target], calib: Any) -> dict[str, Any]:
    """Zero the smallest weights of every planned linear in place."""
    import torch

    modules = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for name, target in plan.items():
            w = modules[name].weight
            mask = magnitude_prune_weight(w, target, per_row=cfg.comparison == "row")
            w.masked_fill_(mask.to(w.device), 0)
            out[name] = {}
    return {"modules": out}
