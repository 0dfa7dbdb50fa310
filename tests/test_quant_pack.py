"""Packing: exact round trips for 2/3/4/8 bits and bit-exact agreement with the GPTQ layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qingzhou.llm.quantized.pack import (
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
)


def _autogptq_pack_reference(intweight: np.ndarray, bits: int) -> np.ndarray:
    """The loop AutoGPTQ's QuantLinear.pack uses (intweight [in, out] uint32), written out longhand
    so the test checks our vectorised bit stream against the published layout, including 3-bit."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    if bits in (2, 4, 8):
        while row < qweight.shape[0]:
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
    else:  # 3 bits: 32 values in 3 words, values 10 and 21 straddle the boundaries
        while row < qweight.shape[0]:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip_and_layout(bits):
    g = torch.Generator().manual_seed(bits)
    out_f, in_f = 96, 128
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    codes[0, :] = 2**bits - 1  # all-ones words exercise the sign bit
    qweight = pack_qweight(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (in_f * bits // 32, out_f)
    assert torch.equal(unpack_qweight(qweight, bits, in_f), codes)
    ref = _autogptq_pack_reference(codes.T.numpy(), bits)
    assert np.array_equal(qweight.numpy(), ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qzeros_store_zero_minus_one(bits):
    g = torch.Generator().manual_seed(10 + bits)
    zeros = torch.randint(1, 2**bits, (4, 64), generator=g)
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (4, 64 * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits, 64), zeros)
    if bits == 4:  # the classic symmetric 4-bit checkpoint: zero 8 stored as 0x77777777
        sym = pack_qzeros(torch.full((1, 32), 8), 4)
        assert sym.tolist() == [[0x77777777] * 4]


def test_uneven_rows_are_padded_to_whole_words():
    codes = torch.randint(0, 16, (8, 40))
    q = pack_qweight(codes, 4)
    assert q.shape == (2 * 4, 8)
    assert torch.equal(unpack_qweight(q, 4, 40), codes)
