"""`fit(model, budget_bytes, cfg, calib)`: the per-linear plan of least measured error whose GPTQ
export fits in `budget_bytes`, returned as the `overrides` that `quantize()` applies.

The plan is data, not an action: `fit` measures (`sensitivity`), costs (`storage`) and allocates
(`solve`), and leaves the model untouched, so the same overrides reproduce the plan in a recipe or
a notebook through the one `quantize()` verb. The budget is the whole safetensors payload (every
tensor `save_quantized` writes, embeddings and norms included); the file adds only its header.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qingzhou.compress.fit.solve import Plan, solve_choice
from qingzhou.compress.fit.storage import KEEP, Option, model_bytes

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from qingzhou.compress.fit.sensitivity import LinearSensitivity
    from qingzhou.compress.quantize.config import QuantizeConfig

REST = "(rest of the model)"  # the tensors fit does not choose for: a fixed cost in the table


@dataclass
class FitResult:
    """The chosen option per linear, as `quantize()` overrides, with its predicted payload bytes."""

    choice: dict[str, Option]
    overrides: list[dict[str, Any]]
    predicted_bytes: int
    budget_bytes: int
    loss: float
    config: dict[str, Any]
    sensitivities: dict[str, LinearSensitivity] = field(repr=False, default_factory=dict)
    plan: Plan | None = field(repr=False, default=None)

    def quantize_config(self) -> dict[str, Any]:
        """The config that reproduces the plan with `quantize(model, cfg)`."""
        return {**self.config, "overrides": self.overrides, "on_indivisible_group": "error"}


def plan_overrides(choice: dict[str, Option]) -> list[dict[str, Any]]:
    """One exact-name `ModuleOverride` dict per linear (keep = skip)."""
    out: list[dict[str, Any]] = []
    for name, o in choice.items():
        pattern = f"^{re.escape(name)}$"
        out.append({"pattern": pattern, "skip": True} if o.keep else
                   {"pattern": pattern, "bits": o.bits, "group_size": o.group_size})
    return out


def fit(model: nn.Module, budget_bytes: int, cfg: QuantizeConfig | dict[str, Any] | None = None, calib: Any = None,
        *, tokenizer: Any = None, options: list[Option] | None = None) -> FitResult:
    """Measure every option of every decoder linear (not in `cfg.skip`) on the calibration set and
    pick the plan of least summed output error whose export fits in `budget_bytes`.

    `cfg`: a quantize config (dict or typed, default RTN) giving the grid (`sym`, `clip_search`),
    `skip` and, for calibrated methods, the engine settings; its `overrides` are replaced by the
    plan. `calib` as for `quantize()`. Raises `RecipeError` naming the smallest reachable size when
    no plan fits."""
    from qingzhou.compress.calibrate import LayerwiseOptions, select_linears
    from qingzhou.compress.driver import calibration_samples
    from qingzhou.compress.fit.sensitivity import measure_sensitivity
    from qingzhou.compress.quantize.registry import QUANTIZERS

    cfg = QUANTIZERS.validate(cfg or {"method": "rtn"})
    chosen, _ = select_linears(model, cfg.skip, ())
    targets = {name for name, _, _ in chosen}
    samples = calibration_samples(calib, cfg, tokenizer, "fit")
    settings = {"device": getattr(cfg, "device", None), "batch_size": getattr(cfg, "batch_size", 8),
                "offload_inputs": getattr(cfg, "offload_inputs", False)}
    sens = measure_sensitivity(model, samples, options,
                               layerwise=LayerwiseOptions(targets=targets.__contains__, **settings),
                               sym=cfg.sym, clip_search=cfg.clip_search)
    rest = model_bytes(model, {}) - sum(s.cost(KEEP) for s in sens.values())
    table: dict[Any, dict[Any, tuple[int, float]]] = {REST: {KEEP: (rest, 0.0)}}
    table.update({name: s.table() for name, s in sens.items()})
    plan = solve_choice(table, budget_bytes)
    choice = {n: o for n, o in plan.choice.items() if n != REST}
    return FitResult(choice=choice, overrides=plan_overrides(choice), predicted_bytes=plan.cost,
                     budget_bytes=budget_bytes, loss=plan.loss,
                     config=cfg.model_dump(mode="json", exclude={"overrides"}), sensitivities=sens, plan=plan)
