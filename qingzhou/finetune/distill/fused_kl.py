"""Distillation divergence without materialising the logits: both heads and the divergence in row chunks.

Why: the divergence needs the student's and the teacher's full-vocabulary distributions at every
trained position. With Gemma 3's 262,144-token vocabulary, 4 rows of 512 tokens are 2 GiB of fp32
logits per model, and the plain path (`losses.divergence`: logits, log-softmaxes, their exps,
gradients and temporaries) held about a dozen such tensors: 24 GB, killed on a 24 GB machine.
As `finetune/fused_loss.py` does for cross-entropy, both models run their own forward with the
output layer bypassed (so they return the final normed hidden states), and the heads run here on
a chunk of rows at a time. The gradient of a chunk's divergence with respect to the student's
logits is turned into gradients of the student's hidden states (and head weight, when it trains)
at once, so the peak holds one chunk of logits for each model whatever the vocabulary.

Gradients, per row, with p = softmax(z / T) and the loss scaled by T^2 (Hinton's factor):
* forward KL(p_t || p_s): dL/dz_s = T (p_s - p_t);
* reverse KL(p_s || p_t): dL/dz_s = T p_s (a - KL) with a = log p_s - log p_t.
Jensen-Shannon and cached top-k teachers keep the plain path (`fused_divergence_supported`).
"""
from __future__ import annotations

from typing import Any

from qingzhou.finetune.fused_loss import CHUNK_ELEMENTS, _compute_dtype, accumulate_chunk, grad_buffers, scaled_grads

FUSED_KINDS = ("forward_kl", "reverse_kl")


def _make_function() -> Any:
    import torch
    import torch.nn.functional as F

    class LinearDivergence(torch.autograd.Function):
        """Sum over rows of T^2 * D(teacher, student) with logits `h @ W.T + b` for each model; the
        student's gradients are computed chunk by chunk during forward and only scaled in backward."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, t_hidden: Any, t_weight: Any, t_bias: Any,
                    kind: str, temperature: float, dtype: Any) -> Any:
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            tw = t_weight.detach().to(dtype)
            tb = t_bias.detach().to(dtype) if t_bias is not None else None
            grad_h, grad_w, grad_b = grad_buffers(ctx, hidden, weight, bias)
            wanted = any(g is not None for g in (grad_h, grad_w, grad_b))
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            step = max(1, CHUNK_ELEMENTS // weight.shape[0])
            for s in range(0, hidden.shape[0], step):
                h = hidden[s:s + step].detach().to(dtype)
                log_s = F.log_softmax(F.linear(h, w, b).float() / temperature, dim=-1)
                with torch.no_grad():
                    th = t_hidden[s:s + step].detach().to(dtype)
                    log_t = F.log_softmax(F.linear(th, tw, tb).float() / temperature, dim=-1)
                a = log_s - log_t  # log p_s - log p_t
                if kind == "forward_kl":
                    p_t = log_t.exp_()
                    total += -(p_t * a).sum() * temperature**2
                    grad = log_s.exp_().sub_(p_t) if wanted else None
                else:  # reverse_kl
                    p_s = log_s.exp_()
                    row_kl = (p_s * a).sum(-1)
                    total += row_kl.sum() * temperature**2
                    grad = p_s.mul_(a.sub_(row_kl[:, None])) if wanted else None
                del a, log_t
                if grad is None:
                    continue
                grad = grad.mul_(temperature)  # T^2 * (1/T): the loss's scale and d(z/T)/dz
                accumulate_chunk(grad, h, w, slice(s, s + step), grad_h, grad_w, grad_b)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> tuple[Any, ...]:
            return (*scaled_grads(ctx, grad_out), None, None, None, None, None, None)

    return LinearDivergence


_FUNCTION: list[Any] = []


def linear_divergence(hidden: Any, weight: Any, bias: Any, t_hidden: Any, t_weight: Any, t_bias: Any,
                      kind: str = "forward_kl", temperature: float = 1.0) -> Any:
    """Summed per-row divergence (`kind`: forward_kl or reverse_kl, times T^2) between the teacher's
    `t_hidden @ t_weight.T + t_bias` and the student's `hidden @ weight.T + bias`, never holding
    more than one chunk of either model's logits. `hidden`, `t_hidden`: (N, H_s), (N, H_t), the
    rows to score. Gradients flow to the student's hidden states, weight and bias only."""
    if kind not in FUSED_KINDS:
        raise ValueError(f"linear_divergence computes {' or '.join(FUSED_KINDS)}, not {kind!r}")
    if not _FUNCTION:
        _FUNCTION.append(_make_function())
    return _FUNCTION[0].apply(hidden, weight, bias, t_hidden, t_weight, t_bias, kind, float(temperature),
                              _compute_dtype(weight))


def fused_divergence_supported(student: Any, teacher: Any, kind: str) -> bool:
    """Both models' logits are a plain linear head on their final hidden states (`llm.head.plain_linear_head`)
    and the divergence has a chunked gradient here."""
    from qingzhou.llm.head import plain_linear_head

    return kind in FUSED_KINDS and plain_linear_head(student) and plain_linear_head(teacher)
