"""Attention over packed rows as one causal SDPA call per packed sample, with no mask.

Why: qingzhou packs several samples into a row and marks them with position ids that restart at 0.
transformers (sdpa) then builds a dense block-diagonal (rows x S x S) mask and SDPA attends over the
whole row with it: on CPU the masked kernel costs S^2 per row whatever the samples, and was 17% of a
SmolLM2 LoRA step at 2 x 512 tokens (flash attention's varlen path does this on GPUs, not on CPU).
Here each sample is its own `is_causal` SDPA call, which costs sum(len_i^2) and needs no mask: the
same values (tested against the masked path), less work.

Training only (`packed_attention(model)`, entered by the loop through `fused_training_ops`): the
model's `_attn_implementation` is switched from "sdpa" to "qz_packed" and back on exit. Any call with
a real padding mask, a KV cache or unequal query/key lengths goes to transformers' own SDPA path.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

NAME = "qz_packed"
_REGISTERED: list[bool] = []


def _segments(position_ids: Any, row: int, length: int) -> list[tuple[int, int]]:
    """[start, end) of each sample in one row: a new sample starts where the position does not go up by 1."""
    if position_ids is None:
        return [(0, length)]
    pos = position_ids[min(row, position_ids.shape[0] - 1)]
    starts = [0] + [i for i in (pos[1:] != pos[:-1] + 1).nonzero().flatten().add(1).tolist()]
    return list(zip(starts, starts[1:] + [length]))


def packed_sdpa_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention interface: query (B, H, S, D), key/value (B, Hkv, S, D) -> (B, S, H, D)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or query.shape[2] != key.shape[2] or kwargs.get("softcap") is not None \
            or getattr(module, "sliding_window", None) or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b in range(query.shape[0]):
        parts = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
                 for s, e in _segments(kwargs.get("position_ids"), b, query.shape[2])]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def packed_mask(**kwargs: Any) -> Any:
    """No mask for unpadded self-attention (the attention splits the samples itself); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    am = kwargs.get("attention_mask")
    if (am is None or bool(am.all())) and kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("q_offset") \
            and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(**kwargs)


def _register() -> None:
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, packed_mask)
    _REGISTERED.append(True)


def _configs(model: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and getattr(c, "_attn_implementation", None) == "sdpa":
            seen[id(c)] = c
    return list(seen.values())


@contextlib.contextmanager
def packed_attention(model: Any, enabled: bool = True) -> Iterator[int]:
    """Inside, SDPA models attend per packed sample; yields how many configs were switched."""
    configs = _configs(model) if enabled else []
    if configs:
        _register()
    for c in configs:
        c._attn_implementation = NAME
    try:
        yield len(configs)
    finally:
        for c in configs:
            c._attn_implementation = "sdpa"
