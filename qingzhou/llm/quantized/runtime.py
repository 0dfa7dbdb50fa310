"""The CPU runtime of a 4-bit model: the output head computes in bf16 like the 4-bit layers do.

At SmolLM2-135M's size the output head (576 x 49152, tied to the embeddings and never quantised)
holds 28M of the 134M weights. Once the decoder's linears are 4-bit (53 MB per token, computed in
bf16 by `int4_kernel.py`), an fp32 head (113 MB per token) is two thirds of the bytes read per
decoded token and caps the speed-up over a dense model: measured on this project's 2-core CPU in one
process, one thread, interleaved (noisy, shared machine), 16 greedy tokens:

    dense fp32 5.0 tok/s, dense bf16 7.1, 4-bit (fp32 head) 9.8, 4-bit + bf16 head 11.7
    -> 4-bit / bf16 1.38x with the fp32 head, 1.65x with the bf16 head

So where a model's 4-bit layers compute in bf16 (CPU, `QuantLinear` layers the int4 kernel takes,
the head in fp32/fp16), `use_bf16_head` swaps the head for `Bf16Head`, which shares the head's weight
`Parameter` (tying, `state_dict` keys and saving are unchanged) and at inference multiplies with a
bf16 copy of it, made once and rebuilt if the weight changes. The logits then differ from the fp32
head's by bf16 rounding, the same bound the 4-bit layers keep (tests/test_quant_runtime.py). With
autograd on (training through the model) the head is the exact fp32 `nn.Linear` computation.
Models whose quantised layers all take the exact dequantising path (3/8-bit, ragged groups) keep
the fp32 head, so they stay exact end to end. Memory: the bf16 copy costs half the head in fp32
(57 MB for SmolLM2).

`load_quantized` and `quantize` (when it packs layers) call `use_fast_runtime` (this head, plus one
int4 matmul per q/k/v and gate/up set: `siblings.py`), so `qingzhou eval`, `bench`, `generate` and
the quickstart get it without a flag; `use_exact_runtime` undoes both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qingzhou.llm.quantized import int4_kernel
from qingzhou.llm.quantized.qlinear import QuantLinear
from qingzhou.llm.quantized.siblings import fuse_siblings, unfuse_siblings

_BF16 = torch.bfloat16


class Bf16Head(nn.Linear):
    """An `nn.Linear` (sharing the original's parameters) that computes in bf16 at inference."""

    def __init__(self, head: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = head.weight  # the same Parameter: tied embeddings stay tied
        self.bias = head.bias
        self._copy: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    def _bf16(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight
        key = (w.data_ptr(), w.device, w._version, None if self.bias is None else self.bias._version)
        if self._copy is None or self._copy[0] != key:
            bias = None if self.bias is None else self.bias.detach().to(_BF16)
            self._copy = (key, w.detach().to(_BF16), bias)
        return self._copy[1], self._copy[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        w, b = self._bf16()
        return F.linear(x.to(_BF16), w, b).to(x.dtype)

    def plain(self) -> nn.Linear:
        """The ordinary `nn.Linear` with the same parameters."""
        head = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                         device="meta", dtype=self.weight.dtype)
        head.weight, head.bias = self.weight, self.bias
        return head


def computes_in_bf16(model: nn.Module) -> bool:
    """Whether `model` has 4-bit layers that the CPU int4 kernel takes (and so compute in bf16)."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel != "dequant" and m.qweight.device.type == "cpu":
            if int4_kernel.why_not(m.bits, m.group_size, m.in_features, m.out_features, m.g_idx) is None:
                return True
    return False


def use_bf16_head(model: nn.Module, on: bool | None = None) -> bool:
    """Install (`on=True`), remove (`False`) or decide by `computes_in_bf16` (None) the bf16 head on
    `model`'s output embeddings; returns whether it is installed. Only an fp32/fp16 `nn.Linear` on
    CPU is swapped."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if not isinstance(head, nn.Linear):
        return False
    if on is None:
        on = (head.weight.device.type == "cpu" and head.weight.dtype in (torch.float32, torch.float16)
              and computes_in_bf16(model))
    if on and not isinstance(head, Bf16Head):
        model.set_output_embeddings(Bf16Head(head))
    elif not on and isinstance(head, Bf16Head):
        model.set_output_embeddings(head.plain())
    return on


def use_fast_runtime(model: nn.Module) -> nn.Module:
    """The default runtime of a packed model held in memory: the bf16 head where the 4-bit layers
    compute in bf16 (`use_bf16_head`), and one int4 matmul per set of linears that read the same
    input (`siblings.fuse_siblings`: q/k/v, gate/up). Neither changes the logits beyond the bf16
    rounding the 4-bit kernel already has."""
    use_bf16_head(model)
    fuse_siblings(model)
    return model


def use_exact_runtime(model: nn.Module) -> nn.Module:
    """Compute every quantised layer and the head exactly (dequantised weights in the model's own
    dtype, no bf16 inside): for comparing with another runtime's fp32 logits."""
    unfuse_siblings(model)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = "dequant"
            m.clear_runtime()
    use_bf16_head(model, False)
    return model
