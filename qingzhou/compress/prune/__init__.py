"""Pruning: magnitude, Wanda, SparseGPT (unstructured and N:M, optional OWL layer sparsities) and
structured pruning that makes a smaller dense model. Heavy names resolve lazily (configs import
without torch)."""
from __future__ import annotations

from qingzhou._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".api": "prune PruneReport",
    ".config": "PruneConfig PruneOverride OWLConfig",
    ".registry": "register_pruner parse_config PRUNERS",
    ".magnitude": "MagnitudeConfig",
    ".wanda": "WandaConfig",
    ".sparsegpt": "SparseGPTConfig",
    ".structured": "structured_prune StructuredConfig StructuredReport",
})
