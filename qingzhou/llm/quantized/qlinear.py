"""A pure-torch dequantising linear layer for GPTQ-layout weights.

It runs on every device torch runs on (CPU, CUDA, NPU, MPS ...) because it only uses shifts, masks
and a matmul: each forward unpacks `qweight`/`qzeros`, rebuilds the [out, in] weight and calls
`F.linear`. `cache_dequantized=True` keeps the rebuilt weight (faster decoding, but the memory
saving is gone); the buffers stay the single source of truth for saving.

4-bit layers also have a fused path (`int4_kernel.py`: torch's int4 packed matmul; on CPU it
computes in bf16 whatever the activation dtype, casting at the layer boundary, and takes a
dequantise-to-bf16 GEMM route for many rows; on CUDA it runs for bf16 activations), chosen by
`kernel`: "auto" (the default) uses it where it is the fast choice, "int4pack" forces the kernel
wherever it runs, "dequant" never uses it (the exact fp32 path, e.g. to compare against).

Inference (no autograd) through the dequantising path - layers the kernel cannot take: 3/8-bit,
ragged or odd group sizes - keeps the rebuilt weight in the activation dtype after the first call
(`cache_dequantized` defaults to on for them): unpacking every layer at every decode step made such
models ~20x slower than dense. Training through the layer rebuilds it per call as before.

Memory at rest. A layer the CPU kernel takes holds its codes twice once packed: the GPTQ-layout
`qweight` (half a byte per weight) and the kernel's pack (as much again). With `compact_when_packed`
(set by `load_quantized` on the layers of a model held wholly in memory) the layer drops `qweight`
after its first CPU forward, where the pack reads back to exactly the same codes (checked), and
rebuilds it from the pack whenever it is asked for: `state_dict` (saving, exports), `codes()`,
`.to()`, new weights. The buffer stays registered with its shape and dtype (a one-element
broadcast stub), so names, shapes and byte counts are unchanged. Llama-3.2-1B's shape, 4-bit g128,
loaded whole on the CPU: resident set after a 4-token forward 2.36 GiB against 2.90 GiB when
layers kept both (measured 2026-12-03).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qingzhou.llm.quantized.grid import QuantizedWeight, dequantize_codes
from qingzhou.llm.quantized.int4_kernel import Int4Pack
from qingzhou.llm.quantized.pack import (
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
        self.cache_dequantized = True  # inference through the dequantising path keeps the weight
        self._cached: torch.Tensor | None = None
        self.kernel = "auto"  # "auto" | "int4pack" | "dequant"
        # qzeros hold v1 (zero - 1) in memory; a layer streamed from a gptq_v2 checkpoint keeps v2
        self.qzeros_v2 = False
        self._fast: dict[tuple[torch.device, torch.dtype], Int4Pack | None] = {}
        # a trainable multiplier of `scales` while they are trained (`finetune/quant_scales.py`): None
        # otherwise, so state dicts hold only the GPTQ tensors
        self.register_parameter("scale_factor", None)
        self.compact_when_packed = False  # drop `qweight` once a CPU pack holds the same codes
        self.keep_dequantized = False  # keep the pack's many-rows weight between calls (runtime.keep_dequantized)
        self._stub: torch.Tensor | None = None  # the stand-in buffer of a compact layer

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

    def zero_points(self) -> torch.Tensor:
        """Zero points [groups, out] whichever convention the buffer holds."""
        zeros = unpack_qzeros(self.qzeros, self.bits, self.out_features)
        return zeros - 1 if self.qzeros_v2 else zeros

    def dequantize_weight(self) -> torch.Tensor:
        """The [out, in] float32 weight these buffers encode."""
        scales = self.scales if self.scale_factor is None else self.scales.float() * self.scale_factor
        return dequantize_codes(self.codes(), scales, self.zero_points(), self.g_idx)

    def is_compact(self) -> bool:
        """Whether `qweight` is dropped (held by the CPU pack; module docstring)."""
        return self._stub is not None and self._buffers.get("qweight") is self._stub

    def _readable_pack(self) -> Int4Pack | None:
        """A CPU pack whose codes read back (`Int4Pack.block`), if the layer has one."""
        return next((p for p in self._fast.values() if p is not None and p.block is not None), None)

    def codes(self) -> torch.Tensor:
        """The integer codes [out, in], from `qweight` or, in a compact layer, from the pack."""
        if not self.is_compact():
            return unpack_qweight(self.qweight, self.bits, self.in_features)
        pack = self._readable_pack()
        codes = pack.codes().to(torch.int32)
        if pack.perm is None:
            return codes
        out = torch.empty_like(codes)
        out[:, pack.perm] = codes  # the pack holds the columns in perm order
        return out

    def gptq_qweight(self) -> torch.Tensor:
        """The GPTQ-layout `qweight` [in*bits/32, out], rebuilt from the pack in a compact layer."""
        return pack_qweight(self.codes(), self.bits) if self.is_compact() else self.qweight

    def _compact(self) -> None:
        """Drop `qweight` if a CPU pack reads back to exactly its codes (else keep it)."""
        if self.is_compact() or self._readable_pack() is None:
            return
        real = self.qweight
        self._stub = torch.zeros(1, dtype=real.dtype, device=real.device).expand(real.shape)
        self._buffers["qweight"] = self._stub
        if not torch.equal(self.gptq_qweight(), real):  # the pack must hold the same codes
            self._buffers["qweight"], self._stub = real, None

    def _expand(self) -> None:
        """Give a compact layer its real `qweight` back (before anything reads or replaces it)."""
        if self.is_compact():
            self._buffers["qweight"] = self.gptq_qweight()
        self._stub = None

    def clear_runtime(self) -> None:
        """Drop the int4 packs and the cached dequantised weight built from the buffers (plain
        attributes: `.to("meta")` and new buffers do not reach them)."""
        self._expand()
        self._fast.clear()
        self._cached = None

    def _load_from_state_dict(self, *args, **kwargs):  # new buffers: packed copies are stale
        self.clear_runtime()
        super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_compact():
            destination[prefix + "qweight"] = self.gptq_qweight()

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): move the real buffer
        self._expand()
        return super()._apply(fn, recurse)

    def fast_kernel(self, device: torch.device, dtype: torch.dtype) -> Int4Pack | None:
        """The fused int4 layout for (device, dtype), built once; None where the kernel does not apply."""
        if self.kernel == "dequant" or self.bits != 4 or self.scale_factor is not None:
            return None  # (scales in training change every step: no pack is built from them)
        key = (device, dtype)
        if key not in self._fast:
            self._fast[key] = Int4Pack.build(self.codes(), self.scales, self.zero_points(), self.g_idx, self.group_size,
                                             device, dtype, force=self.kernel == "int4pack")
        return self._fast[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        # The fused kernels have no backward: training through this layer (LoRA on a quantised
        # base, distillation) takes the dequantising path.
        # Scales being trained (`finetune/quant_scales.py`) change every step: nothing built from
        # them may be kept, and the dequantising path is the one autograd differentiates.
        training_scales = self.scale_factor is not None
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or training_scales)
        fast = None if needs_grad else self.fast_kernel(x.device, x.dtype)
        if fast is not None:
            if self.compact_when_packed and not self.is_compact():
                self._compact()
            y = fast(x, keep=self.keep_dequantized)
            return y + bias if bias is not None else y
        if self._cached is not None and self._cached.device == x.device and self._cached.dtype == x.dtype:
            weight = self._cached
        else:
            weight = self.dequantize_weight().to(x.device, x.dtype)
            self._cached = weight if self.cache_dequantized and not (needs_grad or training_scales) else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")
