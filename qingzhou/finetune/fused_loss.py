"""Next-token loss without materialising the logits: output projection and cross-entropy in row chunks.

Why: for a real vocabulary the logits are the largest activation of a training step. SmolLM2's
49,152-token head on 4 x 512 packed tokens gives a 400 MB fp32 logits tensor, and a plain
`cross_entropy(logits.float())` keeps it, its log-softmax and (after slicing) a copy alive until
backward. Here the head runs on a chunk of rows at a time and the gradient of that chunk
(softmax - one-hot) is turned into the gradients of the hidden states and of the head weight right
away (as Liger's fused linear cross-entropy and torchtune's chunked loss do), so the peak holds
one chunk of logits plus gradients the size of the hidden states and of the head. Nothing is
recomputed, and only labelled rows go through the head at all (the plain path projects prompt and
padding rows too), so it is also fewer FLOPs than the plain path.

The model still runs its own forward with its output layer swapped for an identity
(`llm/head.py`), so "logits" come back as the final (normed) hidden states that the head would
have seen. Models whose logits are more than a plain linear head of those take the plain path
(`llm.head.plain_linear_head`).
"""
from __future__ import annotations

from typing import Any

CHUNK_ELEMENTS = 2**24  # logits elements per chunk (64 MB in fp32)


def _compute_dtype(weight: Any) -> Any:
    import torch

    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def accumulate_chunk(grad: Any, h: Any, w: Any, rows: slice, grad_h: Any, grad_w: Any, grad_b: Any) -> None:
    """Turn one chunk's logit gradient [rows, vocab] into the gradients of its hidden states
    (written into `grad_h[rows]`), the head weight and the bias (added), each only where wanted
    (not None). `grad` is fp32; the matmuls run in `w`'s dtype."""
    if grad_b is not None:
        grad_b += grad.sum(0)
    grad = grad.to(w.dtype)
    if grad_h is not None:
        grad_h[rows] = grad @ w
    if grad_w is not None:
        grad_w += grad.t() @ h


def grad_buffers(ctx: Any, rows: Any, weight: Any, bias: Any) -> tuple[Any, Any, Any]:
    """Gradient buffers of a chunked head loss whose inputs are (hidden rows, weight, bias, ...):
    one shaped like `rows` (filled chunk by chunk) and zeroed fp32 ones for the weight and bias,
    each None where autograd does not want it."""
    import torch

    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    want_b = bias is not None and ctx.needs_input_grad[2]
    return (torch.empty_like(rows) if want_h else None,
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None,
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None)


def scaled_grads(ctx: Any, grad_out: Any) -> tuple[Any, Any, Any]:
    """The backward of a loss whose forward already formed the (hidden, weight, bias) gradients
    (`ctx.saved_tensors`, `ctx.dtypes`): those times the incoming scalar gradient."""
    grad_h, grad_w, grad_b = ctx.saved_tensors
    w_dtype, b_dtype = ctx.dtypes
    return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad_out).to(w_dtype),
            None if grad_b is None else (grad_b * grad_out).to(b_dtype))


def _make_function() -> Any:
    import torch
    import torch.nn.functional as F

    class LinearCrossEntropy(torch.autograd.Function):
        """Sum over labelled rows of CE(hidden @ W.T + b, label); the gradients are computed chunk by
        chunk during forward and only scaled in backward."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, labels: Any, ignore_index: int, dtype: Any) -> Any:
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            # only labelled rows go through the head: prompts, padding and each sample's last token
            # (often a third or more of an SFT batch) cost nothing; their hidden gradient is zero
            rows = (labels != ignore_index).nonzero().flatten()
            every = rows.numel() == hidden.shape[0]
            src, tgt = (hidden, labels) if every else (hidden.index_select(0, rows), labels.index_select(0, rows))
            grad_src, grad_w, grad_b = grad_buffers(ctx, src, weight, bias)
            wanted = any(g is not None for g in (grad_src, grad_w, grad_b))
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            step = max(1, CHUNK_ELEMENTS // weight.shape[0])
            for s in range(0, src.shape[0], step):
                h = src[s:s + step].to(dtype)
                target = tgt[s:s + step]
                logits = F.linear(h, w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
                if not wanted:
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
                accumulate_chunk(grad, h, w, slice(s, s + step), grad_src, grad_w, grad_b)
            grad_h = grad_src
            if grad_src is not None and not every:
                grad_h = torch.zeros_like(hidden).index_copy_(0, rows, grad_src)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> tuple[Any, ...]:
            return (*scaled_grads(ctx, grad_out), None, None, None)

    return LinearCrossEntropy


_FUNCTION: list[Any] = []


def linear_cross_entropy(hidden: Any, weight: Any, bias: Any, labels: Any, ignore_index: int = -100) -> Any:
    """Summed cross-entropy of `hidden @ weight.T + bias` against `labels` (rows equal to
    `ignore_index` skipped), never holding more than one chunk of logits. `hidden`: (N, H),
    `labels`: (N,). Matmuls run in the autocast dtype when autocast is on; sums in fp32."""
    if not _FUNCTION:
        _FUNCTION.append(_make_function())
    return _FUNCTION[0].apply(hidden, weight, bias, labels, ignore_index, _compute_dtype(weight))
