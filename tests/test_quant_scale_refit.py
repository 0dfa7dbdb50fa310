"""GPTQ's scale refit (`GPTQConfig.refit_scales`): for the codes GPTQ chose, the least-squares
group scales; never worse than the scales it had, never touching codes or zero points."""
from __future__ import annotations

import pytest
import torch

from qingzhou.compress.quantize.gptq_solver import gptq_quantize_weight
from qingzhou.compress.quantize.scale_refit import refit_scales
from qingzhou.llm.quantized.grid import QuantScheme

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(rows: int = 96, cols: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, cols, generator=g) * (0.2 + 3 * torch.rand(cols, generator=g))
    X[:, :4] *= 8  # a few outlier input channels, as in LLM activations
    W = torch.randn(rows, cols, generator=g)
    return W, 2 / X.shape[0] * X.T @ X


def _error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    E = (W - Q).double()
    return float(((E @ H.double()) * E).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order,static", [(True, True), (False, False), (True, False)])
def test_refit_keeps_codes_and_lowers_the_output_error(bits, act_order, static):
    W, H = _problem()
    scheme = QuantScheme(bits=bits, group_size=32, sym=False, clip_search=True)
    plain = gptq_quantize_weight(W, H, scheme, act_order=act_order, static_groups=static, hessian_clip=True)
    refit = gptq_quantize_weight(W, H, scheme, act_order=act_order, static_groups=static, hessian_clip=True,
                                 refit=True)
    assert torch.equal(plain.quantized.codes, refit.quantized.codes)
    assert torch.equal(plain.quantized.zeros, refit.quantized.zeros)
    assert torch.equal(plain.quantized.g_idx, refit.quantized.g_idx)
    # the in-memory weight is exactly what a loader rebuilds from the fp16 scales
    assert torch.equal(refit.quantized.dequantize(), refit.weight)
    before, after = _error(W, plain.weight, H), _error(W, refit.weight, H)
    assert after < 0.995 * before, (before, after)


def test_refit_is_the_least_squares_solution_up_to_fp16_rounding():
    W, H = _problem(rows=16, cols=96, seed=1)
    scheme = QuantScheme(bits=3, group_size=32, sym=False, clip_search=True)
    res = gptq_quantize_weight(W, H, scheme, act_order=False, static_groups=True)
    q = res.quantized
    scales, changed = refit_scales(W, q.codes.float(), q.scales.float(), q.zeros.float(), q.g_idx, H)
    assert changed > 0
    # row by row: q = A s with A[:, g] = (codes - zero) on group g's columns; minimise (w - A s) H (w - A s)^T
    L = torch.linalg.cholesky(H.double())  # H = L L^T, so the error is ||(w - A s) L||^2
    for r in range(W.shape[0]):
        a = q.codes[r].double() - q.zeros[:, r].double()[q.g_idx.long()]
        A = torch.zeros(W.shape[1], scales.shape[0], dtype=torch.float64)
        A[torch.arange(W.shape[1]), q.g_idx.long()] = a
        ref = torch.linalg.lstsq(L.T @ A, L.T @ W[r].double()).solution
        assert torch.allclose(scales[:, r].double(), ref, rtol=2e-3), (r, scales[:, r], ref)


def test_a_group_with_no_say_keeps_its_scale():
    W, H = _problem(rows=8, cols=64, seed=2)
    scheme = QuantScheme(bits=3, group_size=32, sym=False, clip_search=True)
    q = gptq_quantize_weight(W, H, scheme, act_order=False, static_groups=True).quantized
    codes = q.codes.float().clone()
    codes[0, :32] = q.zeros[0, 0].float()  # row 0's first group sits on its zero point: q = 0 there
    scales, _ = refit_scales(W, codes, q.scales.float(), q.zeros.float(), q.g_idx, H)
    assert scales[0, 0] == q.scales[0, 0].float()
    assert torch.isfinite(scales).all() and (scales > 0).all()


def test_quantize_refits_only_linears_at_or_below_refit_max_bits():
    """`GPTQConfig.refit_max_bits`: a 3-bit linear's scales move with the default (3), a 4-bit
    linear's stay as without refit; codes and zeros are the same either way."""
    from qingzhou.compress.quantize import quantize
    from qingzhou.finetune.testing import tiny_model

    g = torch.Generator().manual_seed(5)
    calib = [torch.randint(0, 272, (48,), generator=g) for _ in range(8)]
    over = [{"pattern": r"\.self_attn\.", "bits": 4}]  # attention 4-bit, the MLP 3-bit
    models = {}
    for refit in (0, 3):
        m = tiny_model("llama")
        quantize(m, {"method": "gptq", "bits": 3, "group_size": 32, "dense_target": 0.0, "refit_max_bits": refit,
                     "overrides": over}, calib)
        models[refit] = m
    # layer 0's q_proj is in the first group: the same inputs either way, so the same GPTQ result
    q = "model.layers.0.self_attn.q_proj"
    a, b = (models[r].get_submodule(q) for r in (0, 3))
    assert a.bits == 4 and torch.equal(a.scales, b.scales) and torch.equal(a.qweight, b.qweight)
    up = "model.layers.0.mlp.up_proj"
    a, b = (models[r].get_submodule(up) for r in (0, 3))
    assert a.bits == 3 and not torch.equal(a.scales, b.scales)  # 3 bits: refit
