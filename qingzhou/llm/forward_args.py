"""What a causal LM's forward takes: shared by generation, the lean decoder, evaluation and timing."""
from __future__ import annotations

from typing import Any


def accepts(model: Any, argument: str) -> bool:
    """Whether the (innermost) causal LM's forward takes `argument` (e.g. `logits_to_keep`)."""
    import inspect

    inner = model
    while hasattr(inner, "get_base_model"):  # peft wrappers pass extra kwargs through
        inner = inner.get_base_model()
    try:
        return argument in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_argument(model: Any) -> str | None:
    """The forward argument (and output field) carrying the KV cache: transformers >= 5.24 names it
    `cache`, earlier versions `past_key_values`; None for a model that takes neither."""
    return next((k for k in ("cache", "past_key_values") if accepts(model, k)), None)
