"""Pack b-bit integer codes into int32 words exactly as GPTQ checkpoints do, and back.

The GPTQ layout is a little-endian bit stream: value j of a column occupies bits
`j*bits .. j*bits+bits-1` of the concatenated 32-bit words. For 2/4/8 bits that is the familiar
"32/bits values per word, value i at shift bits*i"; for 3 bits it is AutoGPTQ's layout where 32
values fill 3 words and values 10 and 21 straddle word boundaries. One generic routine therefore
covers every width from 1 to 8 bits.

`qweight` packs along the input dimension ([in, out] -> [in*bits/32, out]); `qzeros` packs along
the output dimension ([groups, out] -> [groups, out*bits/32]), so both call `pack_rows` on the
appropriate orientation.
"""
from __future__ import annotations

import torch

_WORD = 32
_MASK32 = (1 << 32) - 1


def packed_rows(n: int, bits: int) -> int:
    """Number of int32 rows that hold `n` values (padded to a multiple of 32 values)."""
    return -(-n // _WORD) * bits


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer `values` [n, m] (each in [0, 2**bits)) along dim 0 into int32 [rows, m]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing")
    n, m = v.shape
    pad = (-n) % _WORD
    if pad:
        v = torch.cat([v, v.new_zeros(pad, m)])
    blocks = v.reshape(-1, _WORD, m)  # [nb, 32, m] -> each block fills `bits` words
    out = torch.zeros(blocks.shape[0], bits, m, dtype=torch.int64, device=v.device)
    for j in range(_WORD):
        word, off = divmod(j * bits, _WORD)
        out[:, word] |= (blocks[:, j] << off) & _MASK32
        spill = off + bits - _WORD
        if spill > 0:
            out[:, word + 1] |= blocks[:, j] >> (bits - spill)
    out = out.reshape(-1, m)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [rows, m] -> int64 values [n, m]."""
    p = packed.to(torch.int64) & _MASK32
    m = p.shape[1]
    blocks = p.reshape(-1, bits, m)
    mask = (1 << bits) - 1
    out = torch.empty(blocks.shape[0], _WORD, m, dtype=torch.int64, device=p.device)
    for j in range(_WORD):
        word, off = divmod(j * bits, _WORD)
        val = blocks[:, word] >> off
        spill = off + bits - _WORD
        if spill > 0:
            val = val | (blocks[:, word + 1] << (bits - spill))
        out[:, j] = val & mask
    return out.reshape(-1, m)[:n]


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] -> GPTQ `qweight` int32 [in*bits/32, out]."""
    return pack_rows(codes.T.contiguous(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """GPTQ `qweight` -> codes [out, in] (int64)."""
    return unpack_rows(qweight, bits, in_features).T


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zeros [groups, out] -> v1 `qzeros` int32 [groups, out*bits/32] (stores zero - 1)."""
    stored = (zeros.to(torch.int64) - 1) & ((1 << bits) - 1)
    return pack_rows(stored.T.contiguous(), bits).T.contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """v1 `qzeros` -> zeros [groups, out] (adds back the 1 the v1 format subtracts)."""
    return unpack_rows(qzeros.T.contiguous(), bits, out_features).T + 1
