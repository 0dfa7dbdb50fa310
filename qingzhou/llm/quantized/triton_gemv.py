"""A few-row (decode) int4 x bf16/fp16 matrix-vector kernel for CUDA, in Triton, on the GPTQ layout.

Why: at batch 1 a 4-bit model's decode step is a chain of matrix-vector products whose time is the
read of the packed weights. torch's int4 kernel (`_weight_int4pack_mm`, tinygemm) measured 1.30x
over bf16 at batch 1 for a 1B shape on an H200 (bench/decode_speed.py); issue 19 asks 1.5x. A GEMV
for up to `MAX_ROWS` rows that reads the GPTQ `qweight` [in/8, out] int32 words as they are stored
(8 codes of one output column per word, so a row of words is a coalesced read along the outputs),
the fp16 scales and the zero terms per group, and splits the input dimension over programs
(`split_k`, fp32 atomic adds) so that a 2048-wide layer still gives every SM work.

    y[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] q[k, n]  -  z[g, n] * sum_{k in g} x[m, k]
    (z = zero * scale: the GPTQ grid w = (q - zero) * scale)

Where it runs: `Int4Pack.build` on a CUDA device builds it beside the tinygemm pack (groups in
order, i.e. no act-order permutation; 4-bit; group size 32-256), checks it against the dequantised
weight, then times both on one row of the layer's own shape and keeps it for decode rows only if it
was faster there (`faster`). So it is used exactly where it measured faster, and never otherwise.
Its memory: one more copy of the codes (half a byte per weight) while it is kept.

Not measured on a GPU yet: no GPU was lent when it was written. It is tested on the CPU through
Triton's interpreter (`TRITON_INTERPRET=1`, tests/test_triton_gemv.py): the same program, so the
indexing, masking, split-K and grouping are checked; speed on CUDA is what the rule above measures.
"""
from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MAX_ROWS = 4  # decode rows; more (prompts) take the tinygemm / GEMM routes
BLOCK_N = 64
_REPEATS = 20


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel (made on first use: Triton reads TRITON_INTERPRET when a function is jitted)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, K_PER: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for kk in range(0, K_PER, BLOCK_K):  # BLOCK_K divides GROUP: one group per step
            k0 = pid_k * K_PER + kk
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * K + offs_k).to(tl.float32)
            words = tl.load(qw_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mask_n[None, :], other=0)
            q = ((words >> ((offs_k[:, None] % 8) * 4)) & 15).to(tl.float32)
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += s * tl.sum(x[:, None] * q, axis=0) - z * tl.sum(x, axis=0)
        tl.atomic_add(y_ptr + m * N + offs_n, acc, mask=mask_n)

    return gemv


def _split_k(blocks: int, n_tiles: int, target: int) -> int:
    """The smallest divisor of `blocks` (K / BLOCK_K) giving at least `target` programs."""
    for d in range(1, blocks + 1):
        if blocks % d == 0 and n_tiles * d >= target:
            return d
    return blocks


@dataclass
class GemvPack:
    """One layer's weights for the kernel: GPTQ `qweight` [K/8, N] int32, per-group scales and
    zero terms [G, N] in the activation dtype."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zs: torch.Tensor
    group_size: int
    in_features: int
    out_features: int
    block_k: int
    split_k: int
    kernel: Any = None  # the jitted kernel, resolved once (no lookups in the call: torch.compile traces it)

    @classmethod
    def build(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              device: torch.device, dtype: torch.dtype) -> GemvPack | None:
        """`codes` [out, in] (input columns in order), `scales`/`zeros` [groups, out]; None where the
        shape does not fit (in_features not a multiple of the group, group not 32-256)."""
        from qingzhou.llm.quantized.pack import pack_qweight

        out_f, in_f = codes.shape
        if group_size not in (32, 64, 128, 256) or in_f % group_size or in_f % 8:
            return None
        block_k = min(group_size, 64)
        n_tiles = -(-out_f // BLOCK_N)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        split = _split_k(in_f // block_k, n_tiles, 4 * sms)
        s = scales.float()
        return cls(pack_qweight(codes, 4).to(device).contiguous(), s.to(device, dtype).contiguous(),
                   (zeros.float() * s).to(device, dtype).contiguous(), group_size, in_f, out_f, block_k, split,
                   _kernel(os.environ.get("TRITON_INTERPRET") == "1"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] (M <= MAX_ROWS, contiguous) -> [M, out] in x's dtype."""
        m = x.shape[0]
        y = torch.zeros(m, self.out_features, dtype=torch.float32, device=x.device)
        grid = (-(-self.out_features // BLOCK_N), self.split_k, m)
        self.kernel[grid](
            x.contiguous(), self.qweight, self.scales, self.zs, y, self.out_features, self.in_features,
            K_PER=self.in_features // self.split_k, GROUP=self.group_size, BLOCK_N=BLOCK_N, BLOCK_K=self.block_k)
        return y.to(x.dtype)


def timed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int = _REPEATS) -> float:
    """Median seconds of `fn(x)` after one warm-up call (synchronising CUDA around each)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    fn(x)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def faster(candidate: Callable, incumbent: Callable, x: torch.Tensor, repeats: int = _REPEATS) -> bool:
    """Whether `candidate(x)` measured faster than `incumbent(x)` here (the rule that keeps the kernel)."""
    return timed(candidate, x, repeats) < timed(incumbent, x, repeats)
