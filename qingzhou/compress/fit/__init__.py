"""Fitting a model to a budget (issue 21): the exact storage cost of each per-linear option
(`storage`), its measured loss (`sensitivity`, GPTQ's own error via `gptq_options`, weighed by the
loss's Fisher in `fisher` and calibrated against end-to-end KL in `kl_scale`), whole layers as options
(`layer_drop`), the budget kinds (`budget`), the speed table (`timing`), the exact allocation
(`solve`), the verb (`api`), the plan as GGUF types (`gguf`) and the Pareto plot (`plot`).
Names resolve lazily (no torch at import)."""
from __future__ import annotations

from qingzhou._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".storage": "Option KEEP linear_bytes option_space options_for model_bytes header_bytes_bound",
    ".solve": "Plan solve_choice",
    ".budget": "Budget parse_size",
    ".api": "fit FitReport FitResult plan_overrides uniform_bytes fit_options",
    ".sensitivity": "LinearSensitivity SensitivityCollector measure_sensitivity",
    ".gguf": "gguf_tensor_types export_fit_gguf GGUF_TYPE_OF_BITS",
    ".plot": "pareto_plot pareto_front",
})
