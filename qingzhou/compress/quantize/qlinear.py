"""A pure-torch dequantising linear layer for GPTQ-layout weights.

It runs on every device torch runs on (CPU, CUDA, NPU, MPS ...) because it only uses shifts, masks
and a matmul: each forward unpacks `qweight`/`qzeros`, rebuilds the [out, in] weight and calls
`F.linear`. `cache_dequantized=True` keeps the rebuilt weight (faster decoding, but the memory
saving is gone); the buffers stay the single source of truth for saving.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qingzhou.compress.quantize.grid import QuantizedWeight, dequantize_codes
from qingzhou.compress.quantize.pack import (
    pack_qweight,
    pack_qzeros,
    packed_rows,
    unpack_qweight,
    unpack_qzeros,
)


class QuantLinear(nn.Module):
    """Drop-in replacement for `nn.Linear` holding `qweight`, `qzeros`, `scales`, `g_idx` (+ bias)."""

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int,
        bias: bool = False, dtype: torch.dtype = torch.float16, n_groups: int | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        gs = group_size if group_size > 0 else in_features
        n_groups = n_groups if n_groups is not None else -(-in_features // gs)
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_rows(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=dtype))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // gs)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype))
        else:
            self.bias = None
        self.cache_dequantized = False
        self._cached: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        """Pack a `QuantizedWeight` (and an optional float bias) into a new layer."""
        out_f, in_f = qw.codes.shape
        layer = cls(in_f, out_f, qw.scheme.bits, qw.scheme.group_size, bias=bias is not None,
                    n_groups=qw.scales.shape[0])
        layer.qweight.copy_(pack_qweight(qw.codes, qw.scheme.bits))
        layer.qzeros.copy_(pack_qzeros(qw.zeros, qw.scheme.bits))
        layer.scales.copy_(qw.scales.half())
        layer.g_idx.copy_(qw.g_idx.to(torch.int32))
        if bias is not None:
            layer.bias = bias.detach().clone()  # keeps the float bias dtype: logits match exactly
        return layer

    def dequantize_weight(self) -> torch.Tensor:
        """The [out, in] float32 weight these buffers encode."""
        codes = unpack_qweight(self.qweight, self.bits, self.in_features)
        zeros = unpack_qzeros(self.qzeros, self.bits, self.out_features)
        return dequantize_codes(codes, self.scales, zeros, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cached is not None and self._cached.device == x.device and self._cached.dtype == x.dtype:
            weight = self._cached
        else:
            weight = self.dequantize_weight().to(x.dtype)
            self._cached = weight if self.cache_dequantized else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")
