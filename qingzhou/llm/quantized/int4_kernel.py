"""torch's packed int4 matmul (tinygemm) for 4-bit weight-only layers, where it exists and is right.

`QuantLinear` stores weights in the GPTQ layout, which every runtime reads but which has to be
dequantised before a plain matmul. torch ships fused int4 x float kernels that read the 4-bit
weights directly: `aten._weight_int4pack_mm` (CUDA, bf16 activations) and
`aten._weight_int4pack_mm_for_cpu` (bf16 is the vectorised case; fp32/fp16 run but are slower than
dense). Their grid is ``w = (q - 8) * scale + zero`` per group, so the GPTQ grid
``w = (q - z) * scale`` maps onto it with ``zero = (8 - z) * scale``.

Act-order checkpoints have a non-monotonic `g_idx`; sorting the input columns by group makes the
groups contiguous again, so the layer keeps a column permutation and gathers `x` with it.

`Int4Pack.build` returns None (and says why) when the layer or device does not fit the kernel;
it also checks the kernel against the dequantising path on a random input, so a layout
disagreement on some device falls back instead of producing wrong logits.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128, 256)
# device type -> activation dtypes for which the fused kernel beats dequantise + matmul (measured)
_FAST_DTYPES = {"cuda": (torch.bfloat16,), "cpu": (torch.bfloat16,)}
_SELF_CHECK_RTOL = 2e-2


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
    if bits != 4:
        return f"{bits}-bit weights (the kernel is 4-bit only)"
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} (the kernel takes {GROUP_SIZES})"
    if in_features % group_size or _inner_k_tiles(in_features) is None:
        return f"in_features {in_features} is not a multiple of the group size and of 32"
    if out_features % 8:
        return f"out_features {out_features} is not a multiple of 8"
    if _column_order(g_idx, group_size) is None:
        return "groups of unequal size in g_idx"
    return None


def _column_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Permutation of input columns that makes every group contiguous, or None if impossible."""
    g = g_idx.long()
    expected = torch.arange(g.numel(), device=g.device) // group_size
    if torch.equal(g, expected):
        return torch.arange(g.numel(), device=g.device)
    perm = torch.sort(g, stable=True).indices
    return perm if torch.equal(g[perm], expected) else None


@dataclass
class Int4Pack:
    """A layer's weights in the kernel's packed layout, for one device and activation dtype."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    perm: torch.Tensor | None  # input-column gather for act-order layers; None when already in order
    group_size: int
    out_features: int
    matmul: Callable

    @classmethod
    def build(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              group_size: int, device: torch.device, dtype: torch.dtype,
              reference: Callable[[torch.Tensor], torch.Tensor], force: bool = False) -> Int4Pack | None:
        """Pack `codes` [out, in] (GPTQ grid) for `device`; None if the kernel is missing or wrong here.

        `force` uses the kernel for activation dtypes where it runs but is not the fast choice.
        """
        packer = _PACKERS.get(device.type)
        if packer is None or not (force or supported(device.type, dtype)):
            return None
        out_f, in_f = codes.shape
        if why_not(4, group_size, in_f, out_f, g_idx):  # also guarantees the order and tiles below
            return None
        order, tiles = _column_order(g_idx, group_size), _inner_k_tiles(in_f)
        identity = torch.equal(order, torch.arange(in_f, device=order.device))
        try:
            pack, matmul = packer[0], packer[1]()
            packed = pack(codes[:, order].to(device), tiles)
            s = scales.float()
            sz = torch.stack([s, (8 - zeros.float()) * s], dim=-1).to(device=device, dtype=dtype).contiguous()
            fast = cls(packed, sz, None if identity else order.to(device), group_size, out_f, matmul)
            x = torch.randn(4, in_f, device=device, dtype=dtype)
            got, want = fast(x).float(), reference(x).float()
        except (RuntimeError, NotImplementedError) as e:  # op missing in this build / device
            warnings.warn(f"int4 packed matmul unavailable on {device.type} ({e}); using the dequantising path",
                          stacklevel=3)
            return None
        err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        if not err <= _SELF_CHECK_RTOL:
            warnings.warn(f"int4 packed matmul on {device.type} disagrees with the dequantised weights "
                          f"(relative error {err:.3g}); using the dequantising path", stacklevel=3)
            return None
        return fast

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = self.matmul(x2.contiguous(), self.packed, self.group_size, self.scales_and_zeros)
        return y.reshape(*lead, self.out_features)
