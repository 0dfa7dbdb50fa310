"""k-quant blocks qingzhou writes (Q4_K, Q5_K, Q6_K): llama.cpp's layout and llama.cpp's scale search.

* Layout: the `gguf` package's dequantizers (the reference numpy port of ggml's) read our bytes back
  as exactly the values our codes stand for (d*sc*L - dmin*m; d*sc*(L-32)).
* Search: the vectorised searches equal a line-by-line scalar port of ggml-quants.c's
  `make_qkx2_quants` / `make_qx_quants` (written out below in float32 as the C code runs), so our
  error is llama.cpp's; and the search is worth having: it beats a plain min/max grid and the
  32-wide Q4_0/Q4_1 of the same bits.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from qingzhou.compress.quantize.formats import kquants
from qingzhou.compress.quantize.formats.kquants import (k4_parts, make_qkx2_quants, make_qx_quants, pack_q2_k,
                                                        pack_q3_k, pack_q4_k, pack_q5_k, pack_q6_k, q2_k_parts,
                                                        q3_k_parts, q6_k_parts, quantize_k)

T = gguf.GGMLQuantizationType
F = np.float32


def _weights(rows=64, cols=512, seed=0):
    """LLM-like rows: gaussian with heavy tails, a few outliers, an all-zero and a constant block."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(4, size=(rows, cols)) * 0.02).astype(F)
    x[1, :256] = 0.0
    x[2, :256] = -0.25
    x[3, 5] = 1.5
    return x


def _rmse(a, b):
    return float(np.sqrt(((a - b) ** 2).mean()))


# --- layout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,nmax,pack", [("Q4_K", 15, pack_q4_k), ("Q5_K", 31, pack_q5_k)])
def test_q4_k_q5_k_bytes_read_back_by_gguf_as_our_codes(kind, nmax, pack):
    x = _weights().reshape(-1, 256)
    d, dmin, ls, lm, L = k4_parts(x, nmax)
    assert L.max() <= nmax and ls.max() <= 63 and lm.max() <= 63
    ours = (d.astype(F)[:, None] * ls.astype(F))[:, :, None] * L.astype(F) \
        - (dmin.astype(F)[:, None] * lm.astype(F))[:, :, None]
    blocks = pack(d, dmin, ls, lm, L)
    assert blocks.shape == (x.shape[0], kquants.BLOCK_BYTES[kind]) == (x.shape[0], gguf.GGML_QUANT_SIZES[T[kind]][1])
    np.testing.assert_array_equal(dequantize(blocks, T[kind]), ours.reshape(x.shape))


def test_q6_k_bytes_read_back_by_gguf_as_our_codes():
    x = _weights().reshape(-1, 256)
    d, sc, L = q6_k_parts(x)
    assert L.max() <= 63
    ours = (d.astype(F)[:, None] * sc.astype(F))[:, :, None] * (L.astype(F) - 32)
    blocks = pack_q6_k(d, sc, L)
    assert blocks.shape == (x.shape[0], 210)
    np.testing.assert_array_equal(dequantize(blocks, T.Q6_K), ours.reshape(x.shape))


def test_q2_k_q3_k_bytes_read_back_by_gguf_as_our_codes():
    x = _weights().reshape(-1, 256)
    d, dmin, sc, mc, L = q2_k_parts(x)
    assert L.max() <= 3 and sc.max() <= 15 and mc.max() <= 15
    ours = (d.astype(F)[:, None] * sc.astype(F))[:, :, None] * L.astype(F) \
        - (dmin.astype(F)[:, None] * mc.astype(F))[:, :, None]
    blocks = pack_q2_k(d, dmin, sc, mc, L)
    assert blocks.shape == (x.shape[0], 84)
    np.testing.assert_array_equal(dequantize(blocks, T.Q2_K), ours.reshape(x.shape))
    d, sc, L = q3_k_parts(x)
    assert L.max() <= 7 and sc.max() <= 63
    ours = (d.astype(F)[:, None] * (sc.astype(F) - 32))[:, :, None] * (L.astype(F) - 4)
    blocks = pack_q3_k(d, sc, L)
    assert blocks.shape == (x.shape[0], 110)
    np.testing.assert_array_equal(dequantize(blocks, T.Q3_K), ours.reshape(x.shape))


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_zero_and_constant_blocks_come_back_exactly(kind):
    x = _weights()
    y = dequantize(quantize_k(x, kind), T[kind])
    assert np.all(y[1, :256] == 0.0)
    assert np.abs(y[2, :256] + 0.25).max() < (2e-2 if kind == "Q2_K" else 2e-3)  # ~one level of a fp16 scale
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(x[:, :320], kind)


# --- search ------------------------------------------------------------------------------------------

def _werr(x, w, y):
    return float((w.astype(np.float64) * (y.astype(np.float64) - x) ** 2).sum())


def _nearest(v):
    return int(np.rint(F(v)))


def _qkx2_scalar(x, w, nmax, rmin, rdelta, nstep):
    """ggml-quants.c make_qkx2_quants, statement by statement, in float32 (use_mad = false)."""
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = F(sum_w * x[0])
    for i in range(1, n):
        mn = min(mn, x[i])
        mx = max(mx, x[i])
        sum_w = F(sum_w + w[i])
        sum_x = F(sum_x + F(w[i] * x[i]))
    mn = min(mn, F(0))
    if mx == mn:
        return F(0), F(-mn), [0] * n
    iscale = F(F(nmax) / F(mx - mn))
    scale = F(F(1) / iscale)
    L = [max(0, min(nmax, _nearest(F(iscale * F(x[i] - mn))))) for i in range(n)]
    best = F(0)
    for i in range(n):
        diff = F(F(scale * L[i]) + mn - x[i])
        best = F(best + F(w[i] * F(diff * diff)))
    if nstep < 1:
        return scale, F(-mn), L
    for step in range(nstep + 1):
        isc = F(F(F(rmin) + F(F(rdelta) * step) + F(nmax)) / F(mx - mn))
        la, sl, sl2, sxl = [], F(0), F(0), F(0)
        for i in range(n):
            li = max(0, min(nmax, _nearest(F(isc * F(x[i] - mn)))))
            la.append(li)
            sl = F(sl + F(w[i] * li))
            sl2 = F(sl2 + F(F(w[i] * li) * li))
            sxl = F(sxl + F(F(w[i] * li) * x[i]))
        D = F(F(sum_w * sl2) - F(sl * sl))
        if D > 0:
            this_scale = F(F(F(sum_w * sxl) - F(sum_x * sl)) / D)
            this_min = F(F(F(sl2 * sum_x) - F(sl * sxl)) / D)
            if this_min > 0:
                this_min, this_scale = F(0), F(sxl / sl2)
            cur = F(0)
            for i in range(n):
                diff = F(F(this_scale * la[i]) + this_min - x[i])
                cur = F(cur + F(w[i] * F(diff * diff)))
            if cur < best:
                L, best, scale, mn = la, cur, this_scale, this_min
    return scale, F(-mn), L


def _qx_scalar(x, nmax):
    """ggml-quants.c make_qx_quants with rmse_type 1 (weights x^2), in float32."""
    n = len(x)
    amax, mx = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = F(abs(v)), v
    if amax < F(1e-15):
        return F(0), [0] * n

    def grid(iscale):
        ls, slx, sl2 = [], F(0), F(0)
        for v in x:
            li = max(-nmax, min(nmax - 1, _nearest(F(iscale * v))))
            ls.append(li + nmax)
            w = F(v * v)
            slx = F(slx + F(F(w * v) * li))
            sl2 = F(sl2 + F(F(w * li) * li))
        return ls, slx, sl2

    L, sumlx, suml2 = grid(F(F(-nmax) / mx))
    scale = F(sumlx / suml2) if suml2 else F(0)
    best = F(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        ls, sumlx, suml2 = grid(F(-F(F(nmax) + F(F(0.1) * step)) / mx))
        if suml2 > 0 and F(sumlx * sumlx) > F(best * suml2):
            L, scale = ls, F(sumlx / suml2)
            best = F(scale * sumlx)
    return scale, L


@pytest.mark.parametrize("nmax,rmin,nstep", [(15, -1.0, 20), (31, -0.5, 15)])
def test_qkx2_search_equals_ggml_scalar_port(nmax, rmin, nstep):
    sub = _weights(rows=4, cols=512, seed=1).reshape(-1, 32)  # 64 sub-blocks (incl. zero/constant ones)
    w = (np.sqrt((sub * sub).mean(axis=1, dtype=F))[:, None] + np.abs(sub)).astype(F)
    scale, the_min, L = make_qkx2_quants(sub, w, nmax, rmin, 0.1, nstep)
    same, ours, ref = 0, 0.0, 0.0
    for j in range(sub.shape[0]):
        s, m, levels = _qkx2_scalar(list(sub[j]), list(w[j]), nmax, rmin, 0.1, nstep)
        if list(L[j]) == levels:
            same += 1
            np.testing.assert_allclose([scale[j], the_min[j]], [s, m], rtol=1e-5, atol=1e-9)
        e_ours, e_ref = _werr(sub[j], w[j], scale[j] * L[j] - the_min[j]), _werr(sub[j], w[j], s * np.array(levels) - m)
        assert e_ours <= 1.05 * e_ref, (j, e_ours, e_ref)
        ours, ref = ours + e_ours, ref + e_ref
    # Only the summation order differs from C; the least-squares fit (sum_w*sum_l2 - sum_l^2) cancels,
    # so a different order could tip the choice between two near-equal grids in a sub-block or two.
    assert same >= sub.shape[0] - 2, same
    assert abs(ours / ref - 1) < 0.01, (ours, ref)


def test_qx_search_equals_ggml_scalar_port():
    sub = _weights(rows=4, cols=512, seed=2).reshape(-1, 16)  # 128 groups of 16, as Q6_K
    scale, L = make_qx_quants(sub, 32)
    same, ours, ref = 0, 0.0, 0.0
    for j in range(sub.shape[0]):
        s, levels = _qx_scalar(list(sub[j]), 32)
        if list(L[j]) == levels:
            same += 1
            np.testing.assert_allclose(scale[j], s, rtol=1e-5, atol=1e-12)
        w = sub[j] * sub[j]
        e_ours, e_ref = _werr(sub[j], w, scale[j] * (L[j] - 32.0)), _werr(sub[j], w, s * (np.array(levels) - 32.0))
        assert e_ours <= 1.05 * e_ref, (j, e_ours, e_ref)
        ours, ref = ours + e_ours, ref + e_ref
    assert same >= 0.95 * sub.shape[0], same  # near-ties of sumlx^2 > best*suml2 (5 of 128 here)
    assert abs(ours / ref - 1) < 0.01, (ours, ref)


def test_the_search_beats_a_plain_grid_and_the_32_wide_formats():
    x = _weights(rows=128, cols=1024, seed=3)
    err = {k: _rmse(dequantize(quantize_k(x, k), T[k]), x) for k in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}
    err.update({k: _rmse(dequantize(quantize(x, T[k]), T[k]), x) for k in ("Q4_0", "Q4_1", "Q5_1", "Q8_0")})
    # Q4_K without the search (nstep 0: min/max grid only), same layout and bits
    sub = x.reshape(-1, 32)
    w = np.sqrt((sub * sub).mean(axis=1, dtype=F))[:, None] + np.abs(sub)
    s, m, L = make_qkx2_quants(sub, w, 15, -1.0, 0.1, -1)
    plain = _rmse((s[:, None] * L - m[:, None]).reshape(x.shape), x)
    s2, m2, L2 = make_qkx2_quants(sub, w, 15, -1.0, 0.1, 20)
    searched = _rmse((s2[:, None] * L2 - m2[:, None]).reshape(x.shape), x)
    assert searched < 0.93 * plain, (searched, plain)
    assert err["Q4_K"] < err["Q4_1"] < err["Q4_0"] < err["Q3_K"] < err["Q2_K"], err
    assert err["Q5_K"] < err["Q5_1"] and err["Q6_K"] < 0.6 * err["Q5_K"] and err["Q8_0"] < err["Q6_K"], err
