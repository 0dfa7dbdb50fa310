"""torch's packed int4 matmul (tinygemm) for 4-bit weight-only layers, where it exists and is right.

`QuantLinear` stores weights in the GPTQ layout, which every runtime reads but which has to be
dequantised before a plain matmul. torch ships fused int4 x float kernels that read the 4-bit
weights directly: `aten._weight_int4pack_mm` (CUDA, bf16 activations) and
`aten._weight_int4pack_mm_for_cpu` (bf16 is the vectorised case; fp32/fp16 run but are slower than
dense). Their grid is ``w = (q - 8) * scale + zero`` per group, so the GPTQ grid
``w = (q - z) * scale`` maps onto it with ``zero = (8 - z) * scale``.

Compute dtype. On CPU the layer computes in bf16 whatever the activation dtype: an fp32 (or fp16)
input is cast to bf16 at the layer boundary and the output cast back, so an fp32 model with 4-bit
layers runs the fast kernel without turning the rest of the model to bf16. The result differs from
the dequantised fp32 reference only by bf16 rounding of the input, the weight and the accumulation
(tests/test_quant_runtime.py holds it to that). On CUDA the kernel only runs for bf16 activations
(as measured for bench/decode_speed.py: 1.30x over bf16 at batch 1 for a 1B shape on an H200). A
one-row GEMV kernel for CUDA (Triton w4a16 or a newer torch int4 op) to reach the 1.5x target is not
here yet: no GPU was lent while the CPU runtime was built, so nothing on CUDA changed or was measured.

Rows rule (CPU). Measured on this project's shared 2-core AMD EPYC (AVX512-BF16), torch 2.13, one
thread, min of interleaved repeats, SmolLM2-135M's layer shapes (576x576, 576x1536, 1536x576), group
64, through `Int4Pack` itself (ms per call; the machine was loaded, so ranges):

    rows   int4 kernel    dequantise to bf16 + GEMM   dense fp32 F.linear   (dense bf16 F.linear)
    1      0.02-0.03      1.8-26                      0.02-0.18             0.04-0.34
    16     0.08-0.20      0.4-3.4                     0.15-0.43             0.07-0.17
    64     0.29-0.75      0.5-1.5                     0.5-1.3               0.17-0.41
    128    0.6-1.5        0.6-7.7                     1.0-8.7               0.27-0.69
    256    1.2-13         1.1-8.9                     5-17                  0.5-1.3
    512    6.5-26         1.5-14                      14-39                 0.9-8.7

The int4 kernel is a matrix-vector kernel: at decode (1 row) it is 1-6x faster than dense fp32 and
bf16; its time grows with the rows, while dequantising the weight to bf16 (`Int4Pack.dequantize`, a
fixed ~0.5-3 ms per layer, no copy kept) and running oneDNN's bf16 GEMM grows slowly. They cross at
about 256 rows. Rule: up to `CPU_KERNEL_MAX_ROWS` (256) rows the kernel, more rows (long prompts,
perplexity windows) the dequantise + GEMM route; both beat dense fp32 at every row count measured.
The rule is deterministic (no per-process timing, which on a shared machine flips between runs), so
a model gives the same logits in every process.

CPUs without a fast bf16 GEMM (`cpu_bf16_gemm_fast`: oneDNN's bf16 support, i.e. AVX-512 or AMX;
plain AVX2 machines, e.g. older AMD EPYC and most laptops, have none) run a bf16 GEMM several times
slower than fp32. There the many-rows route dequantises to fp32 and runs an fp32 GEMM instead.
Measured with `bench/cpu_routes.py` (it prints these figures for the machine it runs on) on such a
2-core AMD EPYC (AVX2 only), one thread, another job running, 2048 rows of a 576 -> 1536 layer: bf16
dequantise + GEMM 419 ms, int4 kernel 99 ms, fp32 dequantise + GEMM 67 ms, dense fp32 49 ms. At 1-256
rows the kernel stays within 1.4-2.4x of a cached fp32 weight without keeping one, and meets the fp32
dequantise + GEMM route between 128 and 256 rows (256 rows: 14.0 against 15.0 ms, 14.2 against
8.3 ms for 1536 -> 576), so the row limit stays 256. During a pass of many long inputs (perplexity
windows) `runtime.keep_dequantized` keeps the route's weight between calls instead of dequantising
every layer again per window (about 5% of a window's time on that CPU).

Act-order checkpoints have a non-monotonic `g_idx`; sorting the input columns by group makes the
groups contiguous again, so the layer keeps a column permutation (made once, when the layer is
packed) and gathers `x` with it; the result is the same sum in another order.

`Int4Pack.build` returns None (and says why) when the layer or device does not fit the kernel;
it also checks the kernel against the dequantising path on a random input, so a layout
disagreement on some device falls back instead of producing wrong logits.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qingzhou.llm.quantized import triton_gemv
from qingzhou.llm.quantized.grid import dequantize_codes

GROUP_SIZES = (32, 64, 128, 256)
# device type -> activation dtypes the fused kernel takes (computing in `_COMPUTE_DTYPE`), measured
_FAST_DTYPES = {"cuda": (torch.bfloat16,), "cpu": (torch.bfloat16, torch.float32, torch.float16)}
_COMPUTE_DTYPE = torch.bfloat16
CPU_KERNEL_MAX_ROWS = 256  # see the rows rule in the module docstring
_SELF_CHECK_RTOL = 2e-2


@functools.cache
def cpu_bf16_gemm_fast() -> bool:
    """Whether this CPU runs bf16 GEMMs natively (oneDNN's check: AVX-512 or AMX); where it does
    not, the many-rows routes compute in fp32 (module docstring)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_gemm_dtype() -> torch.dtype:
    """The dtype of the CPU many-rows GEMM routes (the int4 layers' and the fast head's)."""
    return torch.bfloat16 if cpu_bf16_gemm_fast() else torch.float32


def _inner_k_tiles(in_features: int) -> int | None:
    """Largest tile count the kernels accept for this K (K must divide into 16 * tiles)."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    return None


def _pack_cpu(codes: torch.Tensor, tiles: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), tiles)


def _pack_cuda(codes: torch.Tensor, tiles: int) -> torch.Tensor:
    # CUDA's packer takes two 4-bit codes per byte, even column in the high nibble.
    c = codes.to(torch.int32)
    as_bytes = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(as_bytes, tiles)


_PACKERS: dict[str, tuple[Callable, Callable]] = {
    "cpu": (_pack_cpu, lambda: torch.ops.aten._weight_int4pack_mm_for_cpu),
    "cuda": (_pack_cuda, lambda: torch.ops.aten._weight_int4pack_mm),
}


def supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the fused kernel is the fast choice for activations of `dtype` on `device_type`."""
    return dtype in _FAST_DTYPES.get(device_type, ())


def why_not(bits: int, group_size: int, in_features: int, out_features: int, g_idx: torch.Tensor) -> str | None:
    """None if the layer's shape fits the kernel, else the reason (shown in bench/describe output)."""
    reason = why_not_shape(bits, group_size, in_features, out_features)
    if reason is None and _column_order(g_idx, group_size) is None:
        return "groups of unequal size in g_idx"
    return reason


def why_not_shape(bits: int, group_size: int, in_features: int, out_features: int) -> str | None:
    """`why_not` without the g_idx check: what a layer still on the meta device can be judged by."""
    if bits != 4:
        return f"{bits}-bit weights (the kernel is 4-bit only)"
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} (the kernel takes {GROUP_SIZES})"
    if in_features % group_size or _inner_k_tiles(in_features) is None:
        return f"in_features {in_features} is not a multiple of the group size and of 32"
    if out_features % 8:
        return f"out_features {out_features} is not a multiple of 8"
    return None


def _column_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Permutation of input columns that makes every group contiguous, or None if impossible."""
    g = g_idx.long()
    expected = torch.arange(g.numel(), device=g.device) // group_size
    if torch.equal(g, expected):
        return torch.arange(g.numel(), device=g.device)
    perm = torch.sort(g, stable=True).indices
    return perm if torch.equal(g[perm], expected) else None


def _cpu_pack_block(packed: torch.Tensor, codes: torch.Tensor) -> int | None:
    """The row-block width of the CPU packed layout, if `packed` decodes back to `codes` with one.

    torch does not document `_convert_weight_to_int4pack_for_cpu`'s layout; measured on torch 2.13
    (AVX512): row blocks of 64, each uint8 [K, 32] with byte j of column k holding row j's code in
    its low nibble and row j+32's in its high one; the last N % 64 rows as uint8 [K, rows/2] with
    rows 2j and 2j+1 in the low and high nibble. A 32-row block is tried for other builds; None
    (nothing reads back exactly) means the pack's codes cannot be read back."""
    n, k = codes.shape
    for block in (64, 32):
        if packed.numel() * 2 == n * k and torch.equal(_decode_cpu_pack(packed, n, k, block), codes):
            return block
    return None


def _decode_cpu_pack(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """Codes [N, K] (uint8) of a CPU int4 pack with row blocks of `block` (`_cpu_pack_block`)."""
    flat = packed.reshape(-1)
    full = n // block * block
    q = flat[: full * k // 2].view(n // block, k, block // 2)
    parts = [torch.cat([q & 15, q >> 4], dim=2).permute(0, 2, 1).reshape(full, k)]
    if full < n:  # the tail block: adjacent rows share a byte
        t = flat[full * k // 2:].view(k, (n - full) // 2)
        parts.append(torch.stack([t & 15, t >> 4], dim=2).reshape(k, n - full).T)
    return torch.cat(parts)


@dataclass
class Int4Pack:
    """A layer's weights in the kernel's packed layout, for one device and activation dtype.

    `max_rows`: inputs with more rows than this take the dequantise + GEMM route, in `gemm_dtype`
    (the rows rule in the module docstring); None = always the kernel. `block`: the row-block width of a CPU
    pack that reads back to its codes (`_cpu_pack_block`), else None. The pack holds everything the
    layer computes with (codes, bf16 scales and zero terms), so a layer can drop its GPTQ-layout
    `qweight` once packed and rebuild it from here (`QuantLinear` with `compact_when_packed`)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    perm: torch.Tensor | None  # input-column gather for act-order layers; None when already in order
    group_size: int
    out_features: int
    matmul: Callable
    compute_dtype: torch.dtype = _COMPUTE_DTYPE
    max_rows: int | None = None
    block: int | None = None
    gemm_dtype: torch.dtype = _COMPUTE_DTYPE  # the many-rows route's (fp32 on CPUs without fast bf16)
    gemm_weight: torch.Tensor | None = None  # the many-rows route's weight, while `keep` asks for it
    gemv: Callable | None = None  # CUDA decode rows: the Triton GEMV where it measured faster (triton_gemv.py)

    @classmethod
    def build(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              group_size: int, device: torch.device, dtype: torch.dtype, force: bool = False) -> Int4Pack | None:
        """Pack `codes` [out, in] (GPTQ grid: `scales`/`zeros` [groups, out]) for `device`; None if the
        kernel is missing here, or disagrees with the dequantised weight on a random input.

        `force` uses the kernel for activation dtypes where it runs but is not the fast choice, and
        for every row count. The CPU GEMM route for many rows reads the codes back from the pack,
        so it exists where the pack's layout is known (`block`).
        """
        packer = _PACKERS.get(device.type)
        if packer is None or not (force or supported(device.type, dtype)):
            return None
        out_f, in_f = codes.shape
        if why_not(4, group_size, in_f, out_f, g_idx):  # also guarantees the order and tiles below
            return None
        order, tiles = _column_order(g_idx, group_size), _inner_k_tiles(in_f)
        identity = torch.equal(order, torch.arange(in_f, device=order.device))
        compute = _COMPUTE_DTYPE if device.type == "cpu" else dtype
        try:
            pack, matmul = packer[0], packer[1]()
            ordered = codes[:, order].to(device)
            packed = pack(ordered, tiles)
            block = _cpu_pack_block(packed, ordered.to(torch.uint8)) if device.type == "cpu" else None
            del ordered
            s = scales.float()
            sz = torch.stack([s, (8 - zeros.float()) * s], dim=-1).to(device=device, dtype=compute).contiguous()
            gemm = block is not None and not force
            fast = cls(packed, sz, None if identity else order.to(device), group_size, out_f, matmul, compute,
                       CPU_KERNEL_MAX_ROWS if gemm else None, block,
                       cpu_gemm_dtype() if device.type == "cpu" else compute)
            # the kernel's layout is what could disagree on some device; the GEMM route is plain torch
            rng = torch.Generator(device).manual_seed(0)  # not the global RNG: sampling stays reproducible
            x = torch.randn(4, in_f, device=device, dtype=dtype, generator=rng)
            weight = dequantize_codes(codes, scales, zeros, g_idx).to(device, dtype)
            got, want = fast(x).float(), torch.nn.functional.linear(x, weight).float()
            del weight
        except (RuntimeError, NotImplementedError) as e:  # op missing in this build / device
            warnings.warn(f"int4 packed matmul unavailable on {device.type} ({e}); using the dequantising path",
                          stacklevel=3)
            return None
        err = _rel_err(got, want)
        if not err <= _SELF_CHECK_RTOL:
            warnings.warn(f"int4 packed matmul on {device.type} disagrees with the dequantised weights "
                          f"(relative error {err:.3g}); using the dequantising path", stacklevel=3)
            return None
        if device.type == "cuda" and identity:  # checked on the same input and reference
            fast.gemv = decode_gemv(codes, scales, zeros, group_size, x, want, fast)
        return fast

    def __call__(self, x: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """`x @ W.T`; `keep` keeps the many-rows route's dequantised weight for the next call
        (`runtime.keep_dequantized`), otherwise it is made per call and any kept one is dropped."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        gemm = self.max_rows is not None and x2.shape[0] > self.max_rows
        dtype = self.gemm_dtype if gemm else self.compute_dtype
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if gemm:
            w = self.gemm_weight if keep and self.gemm_weight is not None else self.dequantize(dtype)
            self.gemm_weight = w if keep else None
            y = x2 @ w.T
        elif self.gemv is not None and x2.shape[0] <= triton_gemv.MAX_ROWS:
            y = self.gemv(x2)
        else:
            y = self.matmul(x2.contiguous(), self.packed, self.group_size, self.scales_and_zeros)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def codes(self) -> torch.Tensor:
        """The uint8 codes [out, in] read back from the pack, input columns in `perm` order
        (CPU packs with a known layout only)."""
        if self.block is None:
            raise RuntimeError("this int4 pack's layout is not known; its codes cannot be read back")
        n, k = self.out_features, self.packed.numel() * 2 // self.out_features
        return _decode_cpu_pack(self.packed, n, k, self.block)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight the kernel computes with (its own bf16 scales and zero terms, input
        columns in `perm` order), computed in fp32 and rounded once to `dtype` (none for fp32): the
        GEMM route's weight. Vectorised: about 0.5-3 ms for a 576x1536 layer in bf16."""
        codes = self.codes()
        n, k = codes.shape
        sz = self.scales_and_zeros.float()  # [groups, out, 2]
        scale, zero = sz[..., 0].T.unsqueeze(-1), sz[..., 1].T.unsqueeze(-1)  # [out, groups, 1]
        w = (codes.view(n, k // self.group_size, self.group_size).float() - 8) * scale + zero
        return w.to(dtype).view(n, k)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def decode_gemv(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, x: torch.Tensor,
                want: torch.Tensor, incumbent: Callable) -> triton_gemv.GemvPack | None:
    """The Triton GEMV for this layer's decode rows where Triton is installed, it agrees with `want`
    (the dequantised weight's product with `x`, up to `triton_gemv.MAX_ROWS` rows: `Int4Pack.build`'s
    own check) and it measured faster than `incumbent` on one row of `x` here; else None.
    `QINGZHOU_TRITON_GEMV=0` turns it off. (codes: input columns in order.)"""
    if os.environ.get("QINGZHOU_TRITON_GEMV", "1") == "0" or not triton_gemv.available():
        return None
    try:
        gemv = triton_gemv.GemvPack.build(codes, scales, zeros, group_size, x.device, x.dtype)
        if gemv is None:
            return None
        err = _rel_err(gemv(x), want)
    except Exception as e:  # noqa: BLE001 - a Triton compile or launch failure on this device: keep tinygemm
        warnings.warn(f"Triton int4 GEMV unavailable on {x.device} ({type(e).__name__}: {e}); using "
                      "torch's int4 kernel", stacklevel=3)
        return None
    if not err <= _SELF_CHECK_RTOL:
        warnings.warn(f"Triton int4 GEMV disagrees with the dequantised weights (relative error {err:.3g}); "
                      "using torch's int4 kernel", stacklevel=3)
        return None
    return gemv if triton_gemv.faster(gemv, incumbent, x[:1]) else None
