"""Which linear layers get pruned, and to what (global settings + regex overrides).

Resolved once, before any compute, so an N:M pattern that does not divide a layer's width fails in
seconds with the module name instead of after calibration.
"""
from __future__ import annotations


from torch import nn

from qingzhou.compress.calibrate import select_linears
from qingzhou.compress.prune.config import PruneConfig, parse_nm
from qingzhou.compress.prune.masks import Target
from qingzhou.errors import RecipeError


def build_plan(model: nn.Module, cfg: PruneConfig) -> tuple[dict[str, Target], list[str]]:
    """(target per pruned linear, skipped linears) for the decoder layers of `model`."""
    chosen, skipped = select_linears(model, cfg.skip, cfg.overrides)
    plan: dict[str, Target] = {}
    for full, module, match in chosen:
        sparsity, nm = cfg.sparsity, cfg.nm
        if match is not None:
            if match.nm is not None:
                nm = match.nm
            elif match.sparsity is not None:
                sparsity, nm = match.sparsity, None
        target = Target(sparsity=sparsity, nm=parse_nm(nm))
        if target.nm and module.in_features % target.nm[1]:
            raise RecipeError(
                f"N:M pattern {nm} needs the input width of {full} ({module.in_features}) "
                f"to be divisible by {target.nm[1]}.", where="nm",
                hint="Skip that module (skip: [regex]) or choose another M.")
        plan[full] = target
    return plan, skipped


def layer_index(name: str) -> int:
    """Decoder-layer index of a full module name like `model.layers.3.mlp.up_proj`."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"{name} is not inside a decoder layer")
