"""KL(reference || plan) of the final logits with the output layer applied in vocabulary chunks.

Why: `fit` measures the held-out KL of a few dozen plans (the per-layer and per-kind calibration,
the candidate check, the applied model, the layer drops). Each measurement built the plan's full logits, their
log-softmax and the KL's elementwise terms: with Gemma 3's 262,144-token head that is three
[512, 262144] fp32 tensors (512 MB each) per plan and sample, about half of fit's KL time, and
what kept fit above 3x the time of one uniform GPTQ run on Gemma.

How: per row, with the reference's distribution p = softmax(z_ref) and the plan's logits z = W h + b,

    KL(p || q) = sum_v p_v log p_v  -  h . (sum_v p_v W_v)  -  sum_v p_v b_v  +  logsumexp(z)

The first three terms come from the reference alone (`reference_terms`, once per batch), as long
as the plan's head is the reference's (`shared_head`; `fit` never writes the head). Only logsumexp(z) needs the
plan's whole head, and it is accumulated over chunks of the vocabulary whose logits stay in
cache: no [tokens, vocab] tensor is ever built. The logits are float32 and every sum that can
reach log(vocab) in size is float64, so no term of that size is rounded to float32: against a
float64 computation it is as close as the full-logits float32 path or closer (tests). On Gemma 3's
head, per plan and 512-token sample: 1.2-1.5 s against 2.0-2.2 s (2-core CPU).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

VOCAB_CHUNK = 2048  # head rows per chunk: 2048 x 512 fp32 logits = 4 MB (of 2k-8k, fastest on a 2-core CPU)


@dataclass
class ReferenceTerms:
    """What the reference contributes to each row's KL (see the module docstring)."""

    neg_entropy: torch.Tensor  # [rows] sum_v p log p (float64, as all three)
    mean_weight: torch.Tensor  # [rows, hidden] sum_v p_v W_v
    mean_bias: torch.Tensor | None  # [rows] sum_v p_v b_v (None: the head has no bias)


def _chunks(weight: torch.Tensor, bias: torch.Tensor | None, chunk: int | None) -> Iterator[tuple[Any, Any]]:
    chunk = chunk or VOCAB_CHUNK
    for s in range(0, weight.shape[0], chunk):
        yield weight[s:s + chunk], (bias[s:s + chunk] if bias is not None else None)


def logsumexp(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              chunk: int | None = None) -> torch.Tensor:
    """[rows] logsumexp of `hidden @ weight.T + bias` over the vocabulary, one chunk at a time."""
    import torch
    import torch.nn.functional as F

    out: torch.Tensor | None = None
    for w, b in _chunks(weight, bias, chunk):
        z = F.linear(hidden, w, b)
        top = z.amax(dim=-1)
        # max + log(sum exp(z - max)): the sum is float32, its log and the max's addition float64,
        # so no term of size log(vocab) is rounded to float32 (torch.logsumexp returns float32)
        part = top.double() + torch.exp(z - top[:, None]).sum(-1).double().log()
        out = part if out is None else torch.logaddexp(out, part)
    assert out is not None
    return out


def reference_terms(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    chunk: int | None = None) -> ReferenceTerms:
    """The reference's terms from its final hidden states [rows, hidden], in one pass over the
    head: sums of exp(z - running max) rescaled whenever a chunk raises the max (online softmax)."""
    import torch
    import torch.nn.functional as F

    top: Any = None  # [rows] running max of the logits (float64, as every sum below)
    mass = spread = mean_weight = mean_bias = None  # sums of e, e (z - top), e W, e b with e = exp(z - top)
    for w, b in _chunks(weight, bias, chunk):
        z = F.linear(hidden, w, b)
        new_top = z.amax(dim=-1).double() if top is None else torch.maximum(top, z.amax(dim=-1).double())
        if top is not None:  # earlier chunks' sums, moved to the new max
            drop, shift = torch.exp(top - new_top), top - new_top
            spread = drop * (spread + shift * mass)
            mass = drop * mass
            mean_weight *= drop[:, None]
            if mean_bias is not None:
                mean_bias *= drop
        e = torch.exp(z - new_top[:, None].float())
        add = (e.sum(-1).double(), (e * (z - new_top[:, None].float())).sum(-1).double(), (e @ w).double(),
               (e @ b).double() if b is not None else None)
        if top is None:
            mass, spread, mean_weight, mean_bias = add
        else:
            mass, spread, mean_weight = mass + add[0], spread + add[1], mean_weight + add[2]
            if mean_bias is not None:
                mean_bias = mean_bias + add[3]
        top = new_top
    assert mass is not None and spread is not None and mean_weight is not None
    # p = e / mass, log p = z - top - log(mass): sum p log p = spread / mass - log(mass)
    return ReferenceTerms(spread / mass - mass.log(), mean_weight / mass[:, None],
                          mean_bias / mass if mean_bias is not None else None)


def kl_sum(hidden: torch.Tensor, ref: ReferenceTerms, weight: torch.Tensor, bias: torch.Tensor | None,
           chunk: int | None = None) -> float:
    """Sum over rows of KL(reference || plan), the plan given by its final hidden states [rows, hidden]."""
    cross = (hidden.double() * ref.mean_weight).sum(-1)
    if ref.mean_bias is not None:
        cross = cross + ref.mean_bias
    return float((ref.neg_entropy - cross + logsumexp(hidden, weight, bias, chunk)).sum())


def shared_head(reference: nn.Module, work: nn.Module, written: Iterable[str] = ()) -> tuple[Any, Any] | None:
    """(weight, bias) in float32 of the output layer both models share, or None (then the KL takes
    the full logits): the chunked KL needs logits that are exactly one plain linear head
    (`llm.head.plain_linear_head`), equal in both models, and a head no plan writes (`written`:
    the names of the modules plans write)."""
    import torch

    from qingzhou.llm.head import plain_linear_head, unwrap

    if not (plain_linear_head(reference) and plain_linear_head(work)):
        return None
    a, b = (unwrap(m).get_output_embeddings() for m in (reference, work))
    if any(h is m.get_submodule(n) for n in written for h, m in ((a, reference), (b, work))):
        return None
    if not torch.equal(a.weight, b.weight) or (a.bias is None) != (b.bias is None) or \
            (a.bias is not None and not torch.equal(a.bias, b.bias)):
        return None
    return a.weight.detach().float(), a.bias.detach().float() if a.bias is not None else None


@contextmanager
def heads_bypassed(models: Sequence[nn.Module], head: tuple[Any, Any] | None) -> Iterator[None]:
    """With a shared head, the models' forwards return final hidden states (`llm.head.head_bypassed`)."""
    from qingzhou.llm.head import head_bypassed

    with ExitStack() as stack:
        if head is not None:
            for m in models:
                stack.enter_context(head_bypassed(m))
        yield


def reference_side(model: nn.Module, ids: torch.Tensor, head: tuple[Any, Any] | None) -> Any:
    """What a KL against `model` on `ids` needs: its `ReferenceTerms` (shared head, inside
    `heads_bypassed`) or its full log-probabilities."""
    import torch.nn.functional as F

    out = model(input_ids=ids, use_cache=False).logits.float()  # hidden states when bypassed
    return reference_terms(out.flatten(0, 1), *head) if head is not None else F.log_softmax(out, dim=-1)


def kl_to(model: nn.Module, ids: torch.Tensor, ref: Any, head: tuple[Any, Any] | None) -> float:
    """Sum over the tokens of `ids` of KL(reference || model), `ref` from `reference_side`."""
    import torch.nn.functional as F

    out = model(input_ids=ids, use_cache=False).logits.float()
    if head is not None:
        return kl_sum(out.flatten(0, 1), ref, *head)
    return float(F.kl_div(F.log_softmax(out, dim=-1), ref, log_target=True, reduction="sum"))
