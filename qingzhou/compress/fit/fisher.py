"""How much the model's loss cares about each output channel of each linear: the diagonal Fisher of
the linear outputs, so that `fit` adds up damage in units of loss instead of raw output error.

Why: the sensitivity pass measures each option's output error `sum_t (dy_tc)^2` per output row c
of a linear, on the original activations. Summed as is, errors of different linears are in
different units: a v_proj whose outputs are small and a down_proj feeding the residual stream
look alike, and on SmolLM2 the unweighted plan at the 3-bit size put 37 linears at 2 bits and
ended far worse than uniform 3-bit GPTQ (perplexity 42.7 against 32.9). To second order the loss
grows by `1/2 sum_t sum_c g_tc^2 (dy_tc)^2` with g the loss gradient at the output (the diagonal
Fisher approximation HAWQ and its successors use); taking `F_c = mean_t g_tc^2` gives each row's
weight, and `sum_c F_c err_c` is an estimate of the loss increase that adds up across linears.

One forward + backward of the whole model per calibration sample, with the parameters frozen and
only activations carrying gradients; `targets` are accumulated by output hooks, nothing is stored
per token. Needs the model in memory (the in-memory `fit`); the result is tiny (one float per
output channel of every linear).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - torch is imported where the Fisher is computed
    import torch
    from torch import nn


def weighted_total(row_errors: torch.Tensor, row_weights: torch.Tensor | None) -> float:
    """sum_r row_weights[r] * row_errors[r] (the plain sum without weights): a linear's error in
    loss units when the weights are `output_fisher`'s."""
    if row_weights is None:
        return float(row_errors.sum())
    return float((row_errors * row_weights.to(row_errors)).sum())


def output_fisher(model: nn.Module, samples: Sequence[torch.Tensor], targets: Iterable[str], *,
                  autocast: str | None = None) -> dict[str, torch.Tensor]:
    """{linear name: mean over calibration tokens of (d loss / d output channel)^2} [out_features],
    the loss being the summed next-token cross-entropy of each sample (1-D token tensor).

    `autocast` ("bfloat16"): run the forward and backward under autocast in that dtype where the
    device supports it (the squares are still summed in float64). The Fisher only weighs errors
    against each other; on SmolLM2 the bf16 pass takes about a third of the fp32 time."""
    import contextlib

    import torch
    import torch.nn.functional as F

    modules = dict(model.named_modules())
    names = list(targets)
    acc = {n: torch.zeros(modules[n].out_features, dtype=torch.float64) for n in names}
    tokens = 0
    device = next(model.parameters()).device

    def keep(name: str):
        def on_grad(g: torch.Tensor) -> None:
            acc[name] += g.detach().reshape(-1, g.shape[-1]).double().square().sum(0).cpu()

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(on_grad)
        return hook

    def embed_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.requires_grad_()  # parameters are frozen: gradients start at the embeddings

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()
        amp = contextlib.nullcontext()
        if autocast is not None and torch.amp.is_autocast_available(device.type):
            amp = torch.autocast(device.type, dtype=getattr(torch, autocast))
        with torch.enable_grad(), amp:
            for s in samples:
                ids = s.reshape(1, -1).to(device)
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                F.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
                tokens += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {n: (a / max(tokens, 1)).float() for n, a in acc.items()}
