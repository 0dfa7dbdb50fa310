"""The CPU runtime of a 4-bit model: the output head computes in bf16 like the 4-bit layers do, and
decodes from an int8 copy of its weight.

At SmolLM2-135M's size the output head (576 x 49152, tied to the embeddings and never quantised)
holds 28M of the 134M weights. Once the decoder's linears are 4-bit (53 MB per token, computed in
bf16 by `int4_kernel.py`), an fp32 head (113 MB per token) is two thirds of the bytes read per
decoded token and caps the speed-up over a dense model: measured on this project's 2-core CPU in one
process, one thread, interleaved (noisy, shared machine), 16 greedy tokens:

    dense fp32 5.0 tok/s, dense bf16 7.1, 4-bit (fp32 head) 9.8, 4-bit + bf16 head 11.7
    -> 4-bit / bf16 1.38x with the fp32 head, 1.65x with the bf16 head

A bf16 head still reads 57 MB per token, as much as all 4-bit layers together. So where a model's
4-bit layers compute in bf16 (CPU, `QuantLinear` layers the int4 kernel takes, the head in
fp32/fp16, or bf16 in a model held wholly in memory), `use_fast_head` swaps the head for
`FastHead`, which shares the head's weight `Parameter` (tying, `state_dict` keys and saving are
unchanged) and at inference multiplies
- decode rows (at most `HEAD_INT8_MAX_ROWS`) with a symmetric per-row int8 copy through torch's
  int8 weight-only kernel (`_weight_int8pack_mm`, bf16 activations). SmolLM2's head, 2 threads,
  quiet machine: 1 row 1.02 ms against 1.95 ms for the bf16 matmul, 4 rows 1.61 against 2.04,
  8 rows 3.12 against 2.15 (hence 4); Llama-3.2-3B's 128256 x 3072 head: 25 against 49 ms. In
  the CPU-runtime arms of `bench/decode_speed.py` SmolLM2 4-bit decodes 1.12x faster with it. llama.cpp's
  q4_0 files keep that head in 4.5 bits. WikiText-2 perplexity of SmolLM2 4-bit over 8 windows
  with every row through such an int8 head: 25.381 against 25.385 with the bf16 head;
- more rows (prompts, perplexity windows) with a bf16 copy (the weight itself when it is bf16),
  where the int8 kernel is several times slower than a bf16 GEMM (2048 rows: 1.7 s against 0.2 s);
  on a CPU without a fast bf16 GEMM (`int4_kernel.cpu_bf16_gemm_fast`, plain AVX2) with the weight
  itself, in its own dtype: there a bf16 GEMM is several times slower than fp32 (SmolLM2's head,
  `bench/cpu_routes.py`, one thread, AVX2 EPYC: 64 rows 391 ms bf16, 68 ms fp32, 150 ms int8; 1 row
  7.1 ms int8, 11.1 ms fp32, so decode rows keep the int8 copy there too).
Memory: the int8 copy is a quarter of an fp32 head (half of a bf16 one); the bf16 copy of an fp32
head, made only when many rows come (generate computes the head on the last row only), half.
Each copy is made on first use and rebuilt if the weight changes; the int8 kernel is checked once
against its dequantised weight (and skipped where it does not tile: inputs not a multiple of 16).
The logits differ from the fp32 head's by bf16 rounding (many rows) or int8 + bf16 rounding (decode
rows) (tests/test_quant_runtime.py). With autograd on (training through the model) the head is the
exact fp32 `nn.Linear` computation. Models whose quantised layers all take the exact dequantising
path (3/8-bit, ragged groups) keep the fp32 head, so they stay exact end to end.

`load_quantized` and `quantize` (when it packs layers) call `use_fast_head`, so `qingzhou eval`,
`bench`, `generate` and the quickstart get this head without a flag; `use_exact_runtime` undoes it
and computes every quantised layer exactly too.
(One int4 matmul per q/k/v and gate/up set, sharing their input, was tried and removed: 1.01x,
within the noise, in the CPU-runtime arms of `bench/decode_speed.py` on 2026-12-03.)
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qingzhou.llm.quantized import int4_kernel
from qingzhou.llm.quantized.qlinear import QuantLinear

_BF16 = torch.bfloat16


# Decode rows (at most this many) multiply with the head's int8 copy, more rows with its bf16 copy
# (module docstring).
HEAD_INT8_MAX_ROWS = 4


def _int8_rows(w: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8 codes of `w` [out, in] and their bf16 scales, `rows` rows at a
    time: a float32 temporary of the whole head would be 2 GB for a Llama-3.1-8B vocabulary."""
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], rows):
        block = w[i:i + rows].detach().float()
        scale = block.abs().amax(dim=1).clamp_min(1e-12) / 127
        codes[i:i + rows] = torch.round(block / scale[:, None]).clamp_(-127, 127)
        scales[i:i + rows] = scale
    return codes, scales.to(_BF16)


def _int8_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x, codes, scale)


class FastHead(nn.Linear):
    """An `nn.Linear` (sharing the original's parameters) that computes in bf16 at inference, from
    an int8 copy of its weight for decode rows and a bf16 copy for many rows."""

    def __init__(self, head: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = head.weight  # the same Parameter: tied embeddings stay tied
        self.bias = head.bias
        self.int8_max_rows = HEAD_INT8_MAX_ROWS  # 0: every row through the bf16 copy
        self._copies: dict[str, tuple[tuple, Any]] = {}

    def _key(self) -> tuple:
        w = self.weight
        return (w.data_ptr(), w.device, w._version, None if self.bias is None else self.bias._version)

    def _copy(self, kind: str, build: Callable[[], Any]) -> Any:
        """The `kind` copy of the weight, rebuilt when the weight (or bias) changed."""
        key = self._key()
        if kind not in self._copies or self._copies[kind][0] != key:
            self._copies[kind] = (key, build())
        return self._copies[kind][1]

    def _bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self._copy("bias", lambda: self.bias.detach().to(_BF16))

    def _int8(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(codes, scales) for the int8 kernel, or None where it does not run right here: checked
        once against the dequantised int8 weight on a random input, like the int4 packs."""
        def build():
            if self.weight.device.type != "cpu" or self.in_features % 16:  # the kernel's CPU tiles
                return None
            codes, scale = _int8_rows(self.weight)
            x = torch.randn(2, self.in_features, generator=torch.Generator().manual_seed(0)).to(_BF16)
            try:
                got = _int8_matmul(x, codes, scale).float()
            except (RuntimeError, NotImplementedError):  # op missing in this build
                return None
            # checked on a spread of rows: a float32 copy of a large head would cost gigabytes
            rows = torch.linspace(0, self.out_features - 1, min(self.out_features, 1024)).long()
            want = x.float() @ (codes[rows].float() * scale[rows].float()[:, None]).T
            got = got[:, rows]
            err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
            return (codes, scale) if err <= 2e-2 else None
        return self._copy("int8", build)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)
        int8 = self._int8() if x2.shape[0] <= self.int8_max_rows else None
        if int8 is not None:
            y = _int8_matmul(x2.to(_BF16).contiguous(), *int8)
            b = self._bias()
            y = y if b is None else y + b
        elif int4_kernel.cpu_gemm_dtype() != _BF16 and self.weight.device.type == "cpu":
            # no fast bf16 GEMM on this CPU: the weight itself (module docstring)
            y = F.linear(x2.to(self.weight.dtype), self.weight, self.bias)
        else:
            y = F.linear(x2.to(_BF16), self._copy("bf16", lambda: self.weight.detach().to(_BF16)), self._bias())
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def plain(self) -> nn.Linear:
        """The ordinary `nn.Linear` with the same parameters."""
        head = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                         device="meta", dtype=self.weight.dtype)
        head.weight, head.bias = self.weight, self.bias
        return head


def _cpu_kernel_layers(model: nn.Module) -> Iterator[QuantLinear]:
    """The 4-bit layers of `model` that the CPU int4 kernel takes."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel != "dequant" and m.qweight.device.type == "cpu":
            if int4_kernel.why_not(m.bits, m.group_size, m.in_features, m.out_features, m.g_idx) is None:
                yield m


def computes_in_bf16(model: nn.Module) -> bool:
    """Whether `model` has 4-bit layers that the CPU int4 kernel takes (and so compute in bf16)."""
    return next(_cpu_kernel_layers(model), None) is not None


def use_fast_head(model: nn.Module, on: bool | None = None) -> bool:
    """Install (`on=True`), remove (`False`) or decide by `computes_in_bf16` (None) the fast head on
    `model`'s output embeddings; returns whether it is installed. Only an `nn.Linear` on CPU is
    swapped: an fp32/fp16 one always, a bf16 one (whose int8 copy is all the head adds) only in a
    model held wholly in memory, never in one streamed under a memory budget."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if not isinstance(head, nn.Linear):
        return False
    if on is None:
        dtypes = (torch.float32, torch.float16) + (() if hasattr(model, "qingzhou_offload") else (_BF16,))
        on = head.weight.device.type == "cpu" and head.weight.dtype in dtypes and computes_in_bf16(model)
    if on and not isinstance(head, FastHead):
        model.set_output_embeddings(FastHead(head))
    elif not on and isinstance(head, FastHead):
        model.set_output_embeddings(head.plain())
    return on


def use_exact_runtime(model: nn.Module) -> nn.Module:
    """Compute every quantised layer and the head exactly (dequantised weights in the model's own
    dtype, no bf16 inside): for comparing with another runtime's fp32 logits."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = "dequant"
            m.clear_runtime()
    use_fast_head(model, False)
    return model


# The share of the memory available now that dequantised weights kept for a pass may take.
KEEP_MEMORY_SHARE = 0.25


@contextlib.contextmanager
def keep_dequantized(model: nn.Module, share: float = KEEP_MEMORY_SHARE) -> Iterator[bool]:
    """Within the block the 4-bit CPU layers keep the weight their many-rows route dequantises
    (`Int4Pack.__call__`) instead of rebuilding it at every call; on leaving it is dropped. Yields
    whether it is kept.

    For passes of many long inputs (perplexity windows, log-likelihood batches): each window of a
    perplexity run dequantised every layer again, which made a 4-bit evaluation slower than the
    dense model's on AVX2 CPUs, where that route computes in fp32 (SmolLM2, 2 windows of 2048:
    1.10x the dense time). Kept, the pass costs one dequantisation plus dense-speed GEMMs.
    Rule: only for a model held wholly in memory (never one streamed under a memory budget) and
    only when the kept weights (out x in in the route's dtype, over the layers the kernel takes)
    fit in `share` of the memory available now; otherwise every call dequantises as before.
    Decode rows (the int4 kernel) are unaffected, and the logits are identical either way.
    """
    import psutil

    layers = list(_cpu_kernel_layers(model))
    size = torch.finfo(int4_kernel.cpu_gemm_dtype()).bits // 8
    need = sum(m.in_features * m.out_features for m in layers) * size
    keep = bool(layers) and not hasattr(model, "qingzhou_offload") and \
        need <= share * psutil.virtual_memory().available
    if not keep:
        yield False
        return
    for m in layers:
        m.keep_dequantized = True
    try:
        yield True
    finally:
        for m in layers:
            m.keep_dequantized = False
            for pack in m._fast.values():
                if pack is not None:
                    pack.gemm_weight = None
