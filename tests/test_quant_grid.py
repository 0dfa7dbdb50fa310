"""RTN grid: per-group error bound, zero-point range, fp16 scales, shapes of g_idx."""
from __future__ import annotations

import pytest
import torch

from qingzhou.llm.quantized.grid import QuantScheme, dequantize_codes, rtn_quantize_weight


def _heavy_tailed(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[torch.rand(out_f, in_f, generator=g) < 0.01] *= 20  # outliers, as in real LLM weights
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_rtn_error_bound_per_group(bits, sym, group_size):
    w = _heavy_tailed(48, 128)
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym, clip_search=False)
    qw = rtn_quantize_weight(w, scheme)
    deq = qw.dequantize()
    gs = group_size if group_size > 0 else 128
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (128 // gs, 48)
    assert torch.equal(qw.g_idx.long(), torch.arange(128) // gs)
    assert int(qw.codes.max()) <= 2**bits - 1
    assert int(qw.zeros.min()) >= 1 and int(qw.zeros.max()) <= 2**bits - 1  # v1-storable
    # without clipping, every weight is within half a step of its group's grid
    step = qw.scales.float()[qw.g_idx.long()].T
    err = (deq - w).abs()
    assert bool((err <= step / 2 + 1e-6).all()), float((err - step / 2).max())
    # and the step is no larger than the group's range / (levels - 1), widened at most by one level
    # (asym: zero kept >= 1) or by the sym grid's half-empty side
    groups = w.reshape(48, -1, gs)
    rng = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)).T
    bound = rng * (2.0 if sym else 1.0) / (2**bits - 2) * 1.001 + 1e-7
    assert bool((qw.scales.float() <= bound).all())


def test_clip_search_lowers_error_and_keeps_codes_consistent():
    w = _heavy_tailed(64, 256, seed=3)
    plain = rtn_quantize_weight(w, QuantScheme(bits=3, group_size=64, clip_search=False))
    clipped = rtn_quantize_weight(w, QuantScheme(bits=3, group_size=64, clip_search=True))
    e_plain = (plain.dequantize() - w).pow(2).sum()
    e_clip = (clipped.dequantize() - w).pow(2).sum()
    assert e_clip < 0.95 * e_plain
    # dequantize() is exactly the function of the stored (codes, fp16 scales, zeros)
    rebuilt = dequantize_codes(clipped.codes, clipped.scales, clipped.zeros, clipped.g_idx)
    assert torch.equal(rebuilt, clipped.dequantize())


def test_asymmetric_beats_symmetric_on_skewed_weights():
    w = torch.rand(32, 128) * 0.05 - 0.01  # mostly positive: half of a symmetric grid is wasted
    sym = rtn_quantize_weight(w, QuantScheme(bits=4, group_size=32, sym=True, clip_search=False))
    asym = rtn_quantize_weight(w, QuantScheme(bits=4, group_size=32, sym=False, clip_search=False))
    assert (asym.dequantize() - w).pow(2).mean() < 0.5 * (sym.dequantize() - w).pow(2).mean()


def test_group_containing_only_positive_values_keeps_zero_storable():
    w = torch.rand(8, 64) + 0.1  # min > 0: a naive asymmetric zero point would be 0
    qw = rtn_quantize_weight(w, QuantScheme(bits=4, group_size=32, sym=False, clip_search=False))
    assert int(qw.zeros.min()) >= 1
    step = qw.scales.float()[qw.g_idx.long()].T
    assert bool(((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all())


def test_ragged_last_group():
    w = _heavy_tailed(16, 80)
    qw = rtn_quantize_weight(w, QuantScheme(bits=4, group_size=32, clip_search=False))
    assert qw.scales.shape == (3, 16)
    assert qw.g_idx.tolist() == [i // 32 for i in range(80)]
    step = qw.scales.float()[qw.g_idx.long()].T
    assert bool(((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all())


def test_clip_search_weighted_by_columns_clips_an_outlier_in_a_quiet_column():
    """GPTQ's `hessian_clip` weighs each column's error by its input energy: an outlier in a column
    whose input is nearly always zero is cheap to clip, so the weighted search clips it while the
    plain search keeps the range that covers it."""
    import torch

    from qingzhou.llm.quantized.grid import fake_quantize, find_params

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 64, generator=g) * 0.1
    w[:, 5] = 2.0  # the outlier column
    weight = torch.ones(64)
    weight[5] = 1e-4
    s_plain, z_plain = find_params(w, 4, False, clip_search=True)
    s_weighted, z_weighted = find_params(w, 4, False, clip_search=True, col_weight=weight)
    assert (s_weighted < s_plain * 0.8).all()

    def weighted_err(s, z):
        return ((fake_quantize(w, s[:, None], z[:, None], 15) - w).abs() ** 2.4 * weight).sum()

    assert weighted_err(s_weighted, z_weighted) < weighted_err(s_plain, z_plain)
