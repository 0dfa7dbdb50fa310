"""Perplexity the way the compression papers measure it.

Tokenize the whole text once, cut it into non-overlapping windows of `seq_len` tokens (a trailing
partial window is dropped, as in GPTQ/AWQ/SparseGPT/Wanda), run each window independently, and
average the token-level negative log-likelihood over every predicted token. `ppl = exp(mean NLL)`.
Windows are independent, so numbers depend on `seq_len`: always report it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from qingzhou.errors import DataError
from qingzhou.llm.modes import eval_mode
from qingzhou.progress import progress_bar


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None):
    """Token ids of `text` as a (windows, seq_len) tensor; tokenizer defaults (BOS as the
    tokenizer adds it, once, at the start), the way the paper scripts call `tokenizer(text)`."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}.", hint="Use a smaller seq_len or a longer text.")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Token-level perplexity of `model` on `text` over non-overlapping `seq_len` windows."""
    import torch
    import torch.nn.functional as F

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise DataError(f"seq_len={seq_len} is longer than the model's context ({limit} positions).")
    windows = tokenize_windows(tokenizer, text, seq_len, max_windows)
    from qingzhou.llm.devices import model_device

    device = model_device(model)
    total_nll = 0.0
    total_tokens = 0
    start = time.perf_counter()
    from qingzhou.llm.quantized.runtime import keep_dequantized

    with progress_bar(len(windows), "perplexity", enabled=progress) as advance, torch.inference_mode(), \
            eval_mode(model), keep_dequantized(model):
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
            advance(len(batch), f"ppl {math.exp(total_nll / total_tokens):.3f}")
    seconds = time.perf_counter() - start
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, len(windows), seq_len, seconds, windows.numel() / max(seconds, 1e-9))
