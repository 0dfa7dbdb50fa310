"""llama.cpp k-quant blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in numpy, byte-compatible with ggml.

The `gguf` package can read (dequantise) k-quants but cannot write them, and llama.cpp's quality
comes from its per-block scale search, not from the layout. So this is a port of ggml-quants.c
(`quantize_row_q{2,3,4,5,6}_K_ref`, the path `llama-quantize` takes without an importance matrix)
with its searches: `make_qkx2_quants` (weighted least squares over 21/16 candidate scales with a
minimum, for Q4_K/Q5_K, and with absolute error for Q2_K), `make_qx_quants` (rmse_type 1,
symmetric, 18 candidate scales, for Q6_K) and `make_q3_quants` (coordinate descent, for Q3_K). Everything runs in float32 as the C code does, vectorised over all sub-blocks at once; only
the summation order differs from C, which can flip a rare near-tie between two candidate scales.

Layouts (QK_K = 256 weights per super-block, fp16 `d`/`dmin`):
* Q4_K, 144 bytes: d, dmin, scales[12] (8 six-bit scales and 8 six-bit mins, packed as
  `get_scale_min_k4` reads them), qs[128] (4-bit, two 32-wide sub-blocks per 32 bytes);
* Q5_K, 176 bytes: as Q4_K plus qh[32] (the fifth bit, two bits per 64 weights) before qs;
* Q6_K, 210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8, one per 16
  weights), d;
* Q2_K, 84 bytes: scales[16] (4-bit scale | 4-bit min per 16 weights), qs[64], d, dmin;
* Q3_K, 110 bytes: hmask[32] (third bit), qs[64] (low 2 bits), scales[12] (sixteen 6-bit), d.
Source: llama.cpp ggml/src/ggml-quants.c (MIT licence), as vendored by llama-cpp-python 0.3.36.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_F = np.float32


def _rint(x: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: float32 round-half-to-even."""
    return np.rint(x).astype(np.int32)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric scale search for rows of `x` (n, m): returns (scale, the_min, L) as ggml does.

    Starts from the min/max grid, then tries `nstep + 1` grids `(nmax + rmin + rdelta*i) / range`,
    fitting scale and offset of each by weighted least squares, and keeps the lowest weighted
    squared error (absolute error with `use_mad`, as Q2_K asks). `the_min` is positive
    (dequantised value = scale * L - the_min).
    """

    def loss(d: np.ndarray) -> np.ndarray:
        return np.abs(d) if use_mad else d * d

    x = x.astype(_F, copy=False)
    w = weights.astype(_F, copy=False)
    mn = np.minimum(x.min(axis=1), _F(0))
    mx = x.max(axis=1)
    sum_w = w.sum(axis=1, dtype=_F)
    sum_x = (w * x).sum(axis=1, dtype=_F)
    flat = mx == mn
    rng = np.where(flat, _F(1), mx - mn).astype(_F)
    iscale = (_F(nmax) / rng).astype(_F)
    scale = (_F(1) / iscale).astype(_F)
    L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(_F) + mn[:, None] - x
    best = (w * loss(diff)).sum(axis=1, dtype=_F)
    for step in range(nstep + 1 if nstep >= 1 else 0):  # ggml returns the min/max grid for nstep < 1
        num = _F(rmin) + _F(rdelta) * _F(step) + _F(nmax)
        # ggml reuses `min` as it improves, in the grid's offset and in its range alike
        rng = np.where(flat, _F(1), mx - mn).astype(_F)
        isc = (num / rng).astype(_F)
        la = np.clip(_rint(isc[:, None] * (x - mn[:, None])), 0, nmax)
        lf = la.astype(_F)
        sum_l = (w * lf).sum(axis=1, dtype=_F)
        sum_l2 = (w * lf * lf).sum(axis=1, dtype=_F)
        sum_xl = (w * lf * x).sum(axis=1, dtype=_F)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, _F(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, _F(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, _F(1)), this_scale)
        d = this_scale[:, None] * lf + this_min[:, None] - x
        err = (w * loss(d)).sum(axis=1, dtype=_F)
        better = ok & (err < best)
        L = np.where(better[:, None], la, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, _F(0), scale).astype(_F)
    L = np.where(flat[:, None], 0, L)
    return scale, (-mn).astype(_F), L


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (ggml `make_qx_quants`, rmse_type 1: weights x^2) for rows of `x`.

    Returns (scale, L) with L in [0, 2*nmax) (value = scale * (L - nmax)).
    """
    x = x.astype(_F, copy=False)
    n_rows = x.shape[0]
    ax = np.abs(x)
    idx = ax.argmax(axis=1)  # first maximum, as the C loop's strict `>`
    amax = ax[np.arange(n_rows), idx]
    mx = x[np.arange(n_rows), idx]
    zero = amax < GROUP_MAX_EPS
    mxs = np.where(zero, _F(1), mx).astype(_F)
    w = x * x

    def grid(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lv.astype(_F)
        return lv, (w * x * lf).sum(axis=1, dtype=_F), (w * lf * lf).sum(axis=1, dtype=_F)

    iscale = (_F(-nmax) / mxs).astype(_F)
    lv, sumlx, suml2 = grid(iscale)
    L = lv + nmax
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F(1)), _F(0)).astype(_F)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        isc = (-(_F(nmax) + _F(0.1) * _F(step)) / mxs).astype(_F)
        lv, sumlx, suml2 = grid(isc)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better[:, None], lv + nmax, L)
        new_scale = sumlx / np.where(suml2 > 0, suml2, _F(1))
        scale = np.where(better, new_scale, scale).astype(_F)
        best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, _F(0), scale).astype(_F)
    L = np.where(zero[:, None], 0, L)
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml `make_q3_quants` with do_rmse (Q3_K): the symmetric grid at -nmax/max, then five passes
    of coordinate descent, each weight moved to the level that the current least-squares fit
    (weights x^2) prefers when that lowers the error. Returns (scale, L in [0, 2*nmax))."""
    x = x.astype(_F, copy=False)
    n_rows, n = x.shape
    ax = np.abs(x)
    idx = ax.argmax(axis=1)
    amax = ax[np.arange(n_rows), idx]
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _F(1), x[np.arange(n_rows), idx]).astype(_F)
    iscale = (_F(-nmax) / mx).astype(_F)
    L = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    lf = L.astype(_F)
    sumlx = (w * x * lf).sum(axis=1, dtype=_F)
    suml2 = (w * lf * lf).sum(axis=1, dtype=_F)
    for _ in range(5):  # ggml stops early once a pass changes nothing, which changes nothing after it
        for i in range(n):
            xi, wi, li = x[:, i], w[:, i], L[:, i].astype(_F)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            pos = slx > 0
            new_l = np.clip(_rint(xi * sl2 / np.where(pos, slx, _F(1))), -nmax, nmax - 1)
            nf = new_l.astype(_F)
            slx2 = slx + wi * xi * nf
            sl22 = sl2 + wi * nf * nf
            take = pos & (new_l != L[:, i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(take, new_l, L[:, i])
            sumlx = np.where(take, slx2, sumlx).astype(_F)
            suml2 = np.where(take, sl22, suml2).astype(_F)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, _F(1)), _F(0)).astype(_F)
    return np.where(zero, _F(0), scale).astype(_F), np.where(zero[:, None], 0, L + nmax)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs of Q2_K/Q3_K: per 128 weights (4 rows of 32), byte l = rows 0..3 of column l, 2 bits each."""
    L = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def q2_k_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q2_K codes (`quantize_row_q2_K_ref`): (d, dmin fp16 (n,), scale codes (n, 16), min codes
    (n, 16), L (n, 16, 16) in 0..3); weight = d*sc*L - dmin*m. Sixteen groups of 16, each fitted by
    make_qkx2_quants with |x| weights and absolute error."""
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16).astype(_F, copy=False)
    scales, mins, L = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    q4 = _F(15)
    isc = np.where(max_scale > 0, q4 / np.where(max_scale > 0, max_scale, _F(1)), _F(0)).astype(_F)
    imn = np.where(max_min > 0, q4 / np.where(max_min > 0, max_min, _F(1)), _F(0)).astype(_F)
    sc = (_rint(isc[:, None] * scales) & 0xFF).astype(np.uint8)
    mc = (_rint(imn[:, None] * mins) & 0xFF).astype(np.uint8)
    packed = sc | (mc << 4)  # as stored: a min code above 15 would spill, ggml's does the same
    sc, mc = packed & 0xF, packed >> 4
    d = _f16(np.where(max_scale > 0, max_scale / q4, _F(0)))
    dmin = _f16(np.where(max_min > 0, max_min / q4, _F(0)))
    dq = (d.astype(_F)[:, None] * sc.astype(_F))[:, :, None]
    dm = (dmin.astype(_F)[:, None] * mc.astype(_F))[:, :, None]
    new = np.clip(_rint((x.reshape(nb, 16, 16) + dm) / np.where(dq != 0, dq, _F(1))), 0, 3)
    return d, dmin, sc, mc, np.where(dq != 0, new, L).astype(np.uint8)


def pack_q2_k(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mc: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Q2_K bytes: scales[16] (scale code | min code << 4), qs[64], d, dmin."""
    return np.concatenate([sc | (mc << 4), _pack_2bit(L), d.view(np.uint8).reshape(-1, 2),
                           dmin.view(np.uint8).reshape(-1, 2)], axis=1)


def q3_k_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q3_K codes (`quantize_row_q3_K_ref`): (d fp16 (n,), scale codes (n, 16) in 0..63, L (n, 16, 16)
    in 0..7); weight = d*(sc-32)*(L-4)."""
    nb = x.shape[0]
    scales, L = make_q3_quants(x.reshape(nb * 16, 16), 4)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    ia = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), ia]
    has = max_scale != 0
    iscale = (_F(-32) / np.where(has, max_scale, _F(1))).astype(_F)
    sc = np.where(has[:, None], np.clip(_rint(iscale[:, None] * scales), -32, 31) + 32, 32).astype(np.uint8)
    d = _f16(np.where(has, _F(1) / iscale, _F(0)))
    dj = (d.astype(_F)[:, None] * (sc.astype(_F) - 32))[:, :, None]
    new = np.clip(_rint(x.reshape(nb, 16, 16) / np.where(dj != 0, dj, _F(1))), -4, 3) + 4
    return d, np.where(has[:, None], sc, 0).astype(np.uint8), np.where(dj != 0, new, L).astype(np.uint8)


def pack_q3_k(d: np.ndarray, sc: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Q3_K bytes: hmask[32] (bit k of byte m = third bit of weight 32k+m), qs[64] (low 2 bits),
    scales[12] (low nibbles of codes 0-7 | 8-15 << 4, then 2-bit high parts: byte 8+j%4, shift
    2*(j//4)), d."""
    nb = d.shape[0]
    L = L.reshape(nb, 256)
    hi = (L >> 2).reshape(nb, 8, 32)
    hmask = (hi << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint32).astype(np.uint8)
    scales = np.zeros((nb, 12), dtype=np.uint8)
    scales[:, 0:8] = (sc[:, 0:8] & 0xF) | ((sc[:, 8:16] & 0xF) << 4)
    high = (sc >> 4).reshape(nb, 4, 4)  # [j//4, j%4]
    scales[:, 8:12] = (high << (2 * np.arange(4, dtype=np.uint8))[None, :, None]).sum(axis=1, dtype=np.uint32)
    return np.concatenate([hmask, _pack_2bit(L & 3), scales, d.view(np.uint8).reshape(-1, 2)], axis=1)


def _k4_scales(scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Super-block d/dmin and 6-bit per-sub-block scale/min codes (Q4_K, Q5_K)."""
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    inv_scale = np.where(max_scale > 0, _F(63) / np.where(max_scale > 0, max_scale, _F(1)), _F(0)).astype(_F)
    inv_min = np.where(max_min > 0, _F(63) / np.where(max_min > 0, max_min, _F(1)), _F(0)).astype(_F)
    ls = np.minimum(_rint(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)  # uint8 cast, then MIN
    lm = np.minimum(_rint(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    return _f16(max_scale / _F(63)), _f16(max_min / _F(63)), ls, lm


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12-byte `scales` field: bytes 0-3 scale 0-3 (+ high bits of 4-7), 4-7 min 0-3 (+ high
    bits of mins 4-7), 8-11 low nibbles of scale/min 4-7."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _requant_asym(x: np.ndarray, L: np.ndarray, d: np.ndarray, dmin: np.ndarray, ls: np.ndarray, lm: np.ndarray,
                  nmax: int) -> np.ndarray:
    """Re-round each sub-block on the stored (fp16 x 6-bit) scale/min; sub-blocks with scale 0 keep L."""
    dq = (d.astype(_F)[:, None] * ls.astype(_F))[:, :, None]
    dm = (dmin.astype(_F)[:, None] * lm.astype(_F))[:, :, None]
    safe = np.where(dq != 0, dq, _F(1))
    new = np.clip(_rint((x + dm) / safe), 0, nmax)
    return np.where(dq != 0, new, L).astype(np.uint8)


def k4_parts(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K (nmax 15) / Q5_K (nmax 31) codes of (n_blocks, 256) float32 rows: (d, dmin, ls, lm, L).

    d/dmin fp16 (n_blocks,), ls/lm the 6-bit scale/min codes (n_blocks, 8), L (n_blocks, 8, 32);
    weight = d*ls*L - dmin*lm. Q4_K searches 21 grids from nmax-1, Q5_K 16 from nmax-0.5 (ggml's
    `rmin`/`nstep`); each sub-block's importance is `sqrt(mean x^2) + |x|`.
    """
    rmin, nstep = {15: (-1.0, 20), 31: (-0.5, 15)}[nmax]
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32).astype(_F, copy=False)
    av_x = np.sqrt((sub * sub).sum(axis=1, dtype=_F) / _F(32)).astype(_F)
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    d, dmin, ls, lm = _k4_scales(scales.reshape(nb, 8), mins.reshape(nb, 8))
    L = _requant_asym(x.reshape(nb, 8, 32), L.reshape(nb, 8, 32), d, dmin, ls, lm, nmax)
    return d, dmin, ls, lm, L


def pack_q4_k(d: np.ndarray, dmin: np.ndarray, ls: np.ndarray, lm: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Q4_K bytes: d, dmin, scales[12], qs[128] (byte l of each 32 holds sub-blocks 2k and 2k+1)."""
    L = L.reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           _pack_k4_scales(ls, lm), qs], axis=1)


def pack_q5_k(d: np.ndarray, dmin: np.ndarray, ls: np.ndarray, lm: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Q5_K bytes: d, dmin, scales[12], qh[32] (bit 2k+h of byte l = fifth bit of sub-block 2k+h,
    weight l), qs[128] (low nibbles as Q4_K)."""
    L = L.reshape(-1, 4, 2, 32)
    lo, hi = L & 0xF, L >> 4
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (hi << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint32).astype(np.uint8)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           _pack_k4_scales(ls, lm), qh, qs], axis=1)


def q6_k_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K codes of (n_blocks, 256) float32 rows: (d fp16 (n,), sc int8 (n, 16), L uint8 (n, 16, 16));
    weight = d*sc*(L-32)."""
    nb = x.shape[0]
    scales, L = make_qx_quants(x.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    ia = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), ia]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = (_F(-128) / np.where(zero, _F(1), max_scale)).astype(_F)
    d = _f16(np.where(zero, _F(0), _F(1) / iscale))
    sc = np.minimum(_rint(iscale[:, None] * scales), 127).astype(np.int8)
    sc = np.where(zero[:, None], np.int8(0), sc)
    dj = (d.astype(_F)[:, None] * sc.astype(_F))[:, :, None]
    safe = np.where(dj != 0, dj, _F(1))
    new = np.clip(_rint(x.reshape(nb, 16, 16) / safe), -32, 31) + 32
    L = np.where(dj != 0, new, L)
    return d, sc, np.where(zero[:, None, None], 0, L).astype(np.uint8)


def pack_q6_k(d: np.ndarray, sc: np.ndarray, L: np.ndarray) -> np.ndarray:
    """Q6_K bytes: ql[128], qh[64], scales[16], d. Per 128 weights (4 rows of 32): ql[l] = low
    nibbles of rows 0 and 2, ql[32+l] of rows 1 and 3, qh[l] = the four 2-bit high parts."""
    nb = d.shape[0]
    L = L.reshape(nb, 2, 4, 32)
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    return np.concatenate([ql, qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


def quantize_q2_k_blocks(x: np.ndarray) -> np.ndarray:
    """(n_blocks, 256) float32 -> (n_blocks, 84) uint8 Q2_K blocks (`quantize_row_q2_K_ref`)."""
    return pack_q2_k(*q2_k_parts(x))


def quantize_q3_k_blocks(x: np.ndarray) -> np.ndarray:
    """(n_blocks, 256) float32 -> (n_blocks, 110) uint8 Q3_K blocks (`quantize_row_q3_K_ref`)."""
    return pack_q3_k(*q3_k_parts(x))


def quantize_q4_k_blocks(x: np.ndarray) -> np.ndarray:
    """(n_blocks, 256) float32 -> (n_blocks, 144) uint8 Q4_K blocks (`quantize_row_q4_K_ref`)."""
    return pack_q4_k(*k4_parts(x, 15))


def quantize_q5_k_blocks(x: np.ndarray) -> np.ndarray:
    """(n_blocks, 256) float32 -> (n_blocks, 176) uint8 Q5_K blocks (`quantize_row_q5_K_ref`)."""
    return pack_q5_k(*k4_parts(x, 31))


def quantize_q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """(n_blocks, 256) float32 -> (n_blocks, 210) uint8 Q6_K blocks (`quantize_row_q6_K_ref`)."""
    return pack_q6_k(*q6_k_parts(x))


BLOCK_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q2_K": quantize_q2_k_blocks, "Q3_K": quantize_q3_k_blocks, "Q4_K": quantize_q4_k_blocks, "Q5_K": quantize_q5_k_blocks, "Q6_K": quantize_q6_k_blocks}


def quantize_k(data: np.ndarray, kind: str, *, rows_per_chunk: int = 512) -> np.ndarray:
    """Quantise a 2-D float array whose rows are a multiple of 256 long to `kind` ("Q4_K", ...).

    Returns uint8 of shape (rows, row_bytes), the layout `gguf.GGUFWriter.add_tensor(raw_dtype=)`
    and llama.cpp expect. Rows are processed in chunks so a large matrix needs little extra memory.
    """
    if data.ndim != 2 or data.shape[1] % QK_K:
        raise ValueError(f"{kind} needs rows that are a multiple of {QK_K} long, got shape {data.shape}")
    fn = BLOCK_QUANTIZERS[kind]
    rows, cols = data.shape
    out = np.empty((rows, cols // QK_K * BLOCK_BYTES[kind]), dtype=np.uint8)
    for start in range(0, rows, rows_per_chunk):
        chunk = np.ascontiguousarray(data[start:start + rows_per_chunk], dtype=_F)
        out[start:start + chunk.shape[0]] = fn(chunk.reshape(-1, QK_K)).reshape(chunk.shape[0], -1)
    return out
