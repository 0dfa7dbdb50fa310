"""Which linear layers get quantised, and with which scheme (global settings + regex overrides).

Resolved once, before any compute, so a bad group size or pattern fails in seconds with the module
name in the message instead of after an hour of calibration.
"""
from __future__ import annotations

from torch import nn

from qingzhou.compress.calibrate import select_linears
from qingzhou.compress.quantize.config import FALLBACK_GROUP_SIZES, QuantizeConfig
from qingzhou.llm.quantized.grid import QuantScheme
from qingzhou.errors import RecipeError


def build_plan(model: nn.Module, cfg: QuantizeConfig) -> tuple[dict[str, QuantScheme], list[str]]:
    """(scheme per quantised linear, skipped linears) for the decoder layers of `model`."""
    plan, skipped, _ = resolve_plan(model, cfg)
    return plan, skipped


def resolve_plan(model: nn.Module, cfg: QuantizeConfig) -> tuple[dict[str, QuantScheme], list[str], dict[str, int]]:
    """`build_plan` plus the group size each layer asked for where `on_indivisible_group` changed
    it (the report records those fallbacks)."""
    chosen, skipped = select_linears(model, cfg.skip, cfg.overrides)
    plan: dict[str, QuantScheme] = {}
    requested: dict[str, int] = {}
    for full, module, match in chosen:
        bits, gs, sym = cfg.bits, cfg.group_size, cfg.sym
        if match is not None:
            bits = match.bits if match.bits is not None else bits
            gs = match.group_size if match.group_size is not None else gs
            sym = match.sym if match.sym is not None else sym
        used = _check_divisible(full, module.in_features, gs, cfg.on_indivisible_group)
        if used != gs:
            requested[full] = gs
        plan[full] = QuantScheme(bits=bits, group_size=used, sym=sym, clip_search=cfg.clip_search)
    return plan, skipped, requested


def fallback_group_size(width: int, group_size: int) -> int:
    """The largest of FALLBACK_GROUP_SIZES smaller than `group_size` that divides `width`, else -1
    (one group per output channel): sizes every GPTQ runtime loads, never coarser than asked."""
    return next((g for g in FALLBACK_GROUP_SIZES if g < group_size and width % g == 0), -1)


def _check_divisible(name: str, width: int, gs: int, policy: str) -> int:
    if gs == -1 or gs == width or width % gs == 0:
        return gs
    if policy == "fallback":
        return fallback_group_size(width, gs)
    if policy == "per_channel":
        return -1
    if policy == "ragged":
        return gs
    divisors = [d for d in (16, 32, 48, 64, 96, 128, 192, 256) if width % d == 0]
    raise RecipeError(
        f"group_size {gs} does not divide the input width {width} of {name}.",
        where="group_size",
        hint=(f"Use a divisor of {width} (e.g. {', '.join(map(str, divisors)) or 'none of the usual'}), "
              "-1 for per-channel, or on_indivisible_group: fallback | per_channel | ragged."),
    )
