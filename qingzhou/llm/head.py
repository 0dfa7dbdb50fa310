"""A causal LM's output layer as a plain linear map: when that holds, and running the model with it bypassed.

Why: the logits of a real vocabulary are the largest tensor a forward makes (Gemma 3: 262,144
columns, 512 MB of fp32 for 512 tokens). Code that only needs a reduction of them (a loss, a KL)
can run the model with its head swapped for an identity, so the forward returns the final normed
hidden states, and apply the head itself in chunks. That is exact only when the model's logits
are `lm_head(hidden)` and nothing more: no soft-capping or scaling after the head (config keys in
`LOGIT_POSTPROCESSING`), a plain `nn.Linear` head (not LoRA on `lm_head`, not a quantised head),
and no sharded engine (FSDP, DeepSpeed) whose weights exist only inside its own forward.
Used by fine-tuning's fused losses and by `fit`'s held-out KL.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# config attributes that change logits after the head: a model with any of them set keeps the plain path
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def unwrap(model: Any) -> Any:
    """The model inside wrappers (DDP's `.module`) that do not expose the output embeddings."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    return model


def plain_linear_head(model: Any) -> bool:
    """True when the model's logits are exactly `lm_head(final hidden)` with a plain linear head."""
    import torch

    inner = unwrap(model)
    if any(s in type(m).__name__ for m in (model, inner) for s in ("FullyShardedDataParallel", "DeepSpeedEngine")):
        return False
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return False
    config = getattr(inner, "config", None)
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING)


@contextlib.contextmanager
def head_bypassed(model: Any) -> Iterator[Any]:
    """Inside, the model's output layer returns its input; yields that layer (its weight and bias)."""
    head = unwrap(model).get_output_embeddings()
    previous = head.__dict__.get("forward")  # an instance-level forward someone else set, if any
    head.forward = lambda hidden: hidden
    try:
        yield head
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous
