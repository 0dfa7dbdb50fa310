"""Fitting a model to a budget (issue 21): the exact storage cost of each per-linear option
(`storage`), its measured loss (`sensitivity`), and the exact allocation (`solve`).
Names resolve lazily (no torch at import)."""
from __future__ import annotations

from qingzhou._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".storage": "Option KEEP linear_bytes option_space options_for model_bytes",
    ".solve": "Plan solve_choice",
    ".api": "fit FitResult plan_overrides",
    ".sensitivity": "LinearSensitivity SensitivityCollector measure_sensitivity",
})
