"""Pruning: magnitude, Wanda, SparseGPT (unstructured and N:M, optional OWL layer sparsities) and
structured pruning that makes a smaller dense model. Heavy names resolve lazily (configs import
without torch)."""
from __future__ import annotations

from qingzhou._lazy import lazy_getattr

_LAZY = {
    "prune": "qingzhou.compress.prune.api",
    "PruneReport": "qingzhou.compress.prune.api",
    "PruneConfig": "qingzhou.compress.prune.config",
    "PruneOverride": "qingzhou.compress.prune.config",
    "OWLConfig": "qingzhou.compress.prune.config",
    "register_pruner": "qingzhou.compress.prune.registry",
    "parse_config": "qingzhou.compress.prune.registry",
    "PRUNERS": "qingzhou.compress.prune.registry",
    "MagnitudeConfig": "qingzhou.compress.prune.magnitude",
    "WandaConfig": "qingzhou.compress.prune.wanda",
    "SparseGPTConfig": "qingzhou.compress.prune.sparsegpt",
    "structured_prune": "qingzhou.compress.prune.structured",
    "StructuredConfig": "qingzhou.compress.prune.structured",
    "StructuredReport": "qingzhou.compress.prune.structured",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
