"""MoEfication (Zhang et al. 2022, as in BMCook): split each dense FFN into experts of co-activated
neurons, add a router, and run only the top-e experts per token. Names resolve lazily (the config
imports without torch)."""
from __future__ import annotations

from qingzhou._lazy import lazy_getattr

_LAZY = {
    "moefy": "qingzhou.compress.moefy.api",
    "MoefyReport": "qingzhou.compress.moefy.api",
    "MoefyConfig": "qingzhou.compress.moefy.config",
    "MoefyEvalConfig": "qingzhou.compress.moefy.config",
    "MoEMLP": "qingzhou.llm.moe",
    "set_top_k": "qingzhou.llm.moe",
    "save_moefied": "qingzhou.compress.moefy.saving",
    "apply_moefication": "qingzhou.llm.moe",
    "load_moefied": "qingzhou.compress.moefy.saving",
    "is_moefied_folder": "qingzhou.llm.moe",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
