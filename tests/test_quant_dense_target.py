"""GPTQ's dense targets (`GPTQConfig.dense_target`): the correction is the least-squares target,
layer 0's first linears are untouched, and the whole model lands nearer the dense one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qingzhou.compress.dense_target import DenseStream, _Cross
from qingzhou.compress.hessian import HessianAccumulator
from qingzhou.compress.quantize import quantize
from qingzhou.finetune.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _stream_with(module: nn.Module, dense: torch.Tensor, x: torch.Tensor) -> DenseStream:
    s = DenseStream()
    acc = _Cross()
    acc.add(dense, x)
    s.cross[module] = acc
    return s


def test_correction_is_the_least_squares_fit_of_the_dense_outputs():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(24, 8, bias=False)
    X = torch.randn(400, 24, generator=g, dtype=torch.float64).float()  # the dense model's inputs
    Xq = X + 0.1 * torch.randn(400, 24, generator=g)  # the compressed model's: bent by earlier layers
    H = HessianAccumulator(24, "cpu")
    H.add(Xq)
    Wt = _stream_with(lin, X, Xq).correct(lin, H.H, 400, damp_percent=0.0)
    # argmin_Q ||X W^T - Xq Q^T||: the ordinary least-squares solution
    ref = torch.linalg.lstsq(Xq.double(), (X @ lin.weight.detach().T).double()).solution.T
    assert torch.allclose(Wt.double(), ref, atol=1e-4), float((Wt.double() - ref).abs().max())
    # and it fits the dense outputs better than the weight itself does
    W = lin.weight.detach()
    assert ((X @ W.T - Xq @ Wt.T) ** 2).sum() < ((X @ W.T - Xq @ W.T) ** 2).sum()


def test_identical_inputs_leave_the_weight_unchanged_and_unpaired_ones_are_skipped():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(16, 4, bias=False)
    X = torch.randn(64, 16, generator=g)
    H = HessianAccumulator(16, "cpu")
    H.add(X)
    Wt = _stream_with(lin, X, X).correct(lin, H.H, 64, damp_percent=0.01)
    assert torch.equal(Wt, lin.weight.detach())  # D = 0 exactly
    s = DenseStream()
    s.inputs[lin], s.seen[lin] = [X[:32]], 0  # an MoE expert reached by other tokens in the dense stream
    s.add(lin, X)
    assert s.correct(lin, H.H, 64, damp_percent=0.01) is None


def _calib():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 272, (48,), generator=g) for _ in range(12)]


def test_layer0_first_group_matches_plain_gptq_and_later_layers_differ():
    calib = _calib()
    out = {}
    for dense in (False, True):
        m = tiny_model("llama")
        rep = quantize(m, {"method": "gptq", "bits": 3, "group_size": 32, "dense_target": 0.5 if dense else 0.0}, calib)
        out[dense] = (m, rep)
    (plain, _), (dt, rep) = out[False], out[True]
    q0 = "model.layers.0.self_attn.q_proj"
    def w(model, name):
        return model.get_submodule(name).dequantize_weight()

    assert torch.equal(w(plain, q0), w(dt, q0))
    last = "model.layers.1.mlp.down_proj"
    assert not torch.equal(w(plain, last), w(dt, last))
    assert all(m.get("dense_target") for m in rep.modules.values())


def test_dense_target_lands_nearer_the_dense_model():
    """At 2 bits on the tiny model: KL of the quantized model's next-token distribution to the
    dense one's, on the calibration tokens, is lower with dense targets."""
    calib = _calib()
    ids = torch.stack(calib)
    ref = tiny_model("llama")
    with torch.no_grad():
        p = torch.log_softmax(ref(ids).logits.double(), -1)
    kl = {}
    for dense in (False, True):
        m = tiny_model("llama")
        quantize(m, {"method": "gptq", "bits": 2, "group_size": 32, "dense_target": 0.5 if dense else 0.0}, calib)
        with torch.no_grad():
            q = torch.log_softmax(m(ids).logits.double(), -1)
        kl[dense] = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl[True] < kl[False], kl


def test_alpha_scales_the_correction():
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(16, 4, bias=False)
    X = torch.randn(128, 16, generator=g)
    Xq = X + 0.2 * torch.randn(128, 16, generator=g)
    H = HessianAccumulator(16, "cpu")
    H.add(Xq)
    W = lin.weight.detach()
    full = _stream_with(lin, X, Xq).correct(lin, H.H, 128, damp_percent=0.01)
    quarter = _stream_with(lin, X, Xq).correct(lin, H.H, 128, damp_percent=0.01, alpha=0.25)
    assert torch.allclose(quarter - W, 0.25 * (full - W), atol=1e-6)
