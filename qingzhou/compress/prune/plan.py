"""Which linear layers get pruned, and to what (global settings + regex overrides).

Resolved once, before any compute, so an N:M pattern that does not divide a layer's width fails in
seconds with the module name instead of after calibration.
"""
from __future__ import annotations

import re

from torch import nn

from qingzhou.compress.calibrate import find_decoder_layers
from qingzhou.compress.prune.config import PruneConfig, parse_nm
from qingzhou.compress.prune.masks import Target
from qingzhou.errors import RecipeError


def build_plan(model: nn.Module, cfg: PruneConfig) -> tuple[dict[str, Target], list[str]]:
    """(target per pruned linear, skipped linears) for the decoder layers of `model`."""
    layers, prefix = find_decoder_layers(model)
    plan: dict[str, Target] = {}
    skipped: list[str] = []
    skip = [re.compile(p) for p in cfg.skip]
    overrides = [(re.compile(o.pattern), o) for o in cfg.overrides]
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            full = f"{prefix}.{i}.{name}"
            match = next((o for p, o in overrides if p.search(full)), None)
            if any(p.search(full) for p in skip) or (match is not None and match.skip):
                skipped.append(full)
                continue
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
