"""MoEfication (Zhang et al. 2022, as in BMCook): split each dense FFN into experts of co-activated
neurons, add a router, and run only the top-e experts per token. Names resolve lazily (the config
imports without torch)."""
from __future__ import annotations

from qingzhou._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".api": "moefy MoefyReport",
    ".config": "MoefyConfig MoefyEvalConfig",
    "qingzhou.llm.moe": "MoEMLP set_top_k apply_moefication is_moefied_folder",
    ".saving": "save_moefied load_moefied",
})
