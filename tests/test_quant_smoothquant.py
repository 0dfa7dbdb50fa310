"""SmoothQuant: smoothing keeps the function; W8A8 stays close to fp32 and smoothing helps it."""
from __future__ import annotations

import pytest
import torch

from qingzhou.compress.quantize import quantize
from qingzhou.compress.quantize.smoothquant import W8A8Linear, quantize_per_token, smooth
from qingzhou.errors import RecipeError
from qingzhou.finetune.testing import tiny_model

torch.set_num_threads(1)


def _calib(n=8, t=32):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 272, (t,), generator=g) for _ in range(n)]


def _outlier_model(arch="llama"):
    """Norm weights with a few huge channels: the activation outliers SmoothQuant exists for."""
    m = tiny_model(arch)
    with torch.no_grad():
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
                norm.weight[:2] *= 40.0
    return m


def _rel(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smoothing_alone_keeps_the_function(arch):
    ids = torch.stack(_calib())
    m = _outlier_model(arch)
    with torch.no_grad():
        ref = m(ids).logits
    before = m.model.layers[0].input_layernorm.weight.clone()
    smoothed = smooth(m, {"alpha": 0.5, "smooth_linear_inputs": True}, _calib())
    assert len(smoothed) >= 4  # two norms per layer (+ up->down)
    assert not torch.allclose(m.model.layers[0].input_layernorm.weight, before)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_w8a8_close_to_fp32():
    calib = _calib()
    ids = torch.stack(calib)
    m = tiny_model("llama")
    with torch.no_grad():
        fp = m(ids).logits
    rep = quantize(m, {"method": "smoothquant"}, calib)
    assert len(rep.modules) == 14 and rep.linear_bytes_after < 0.3 * rep.linear_bytes_before
    assert sum(isinstance(x, W8A8Linear) for x in m.modules()) == 14
    with torch.no_grad():
        err = _rel(m(ids).logits, fp)
    assert 0 < err < 0.02, err


def test_smoothing_reduces_w8a8_error_with_outlier_channels():
    calib = _calib()
    ids = torch.stack(calib)
    with torch.no_grad():
        fp = _outlier_model()(ids).logits
    errs = {}
    for alpha in (0.0, 0.5):
        m = _outlier_model()
        quantize(m, {"method": "smoothquant", "alpha": alpha}, calib)
        with torch.no_grad():
            errs[alpha] = _rel(m(ids).logits, fp)
    assert errs[0.5] < 0.75 * errs[0.0], errs


def test_per_token_quantisation_error_bound():
    x = torch.randn(4, 16, 64)
    q = quantize_per_token(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert bool(((q - x).abs() <= step / 2 + 1e-7).all())
    assert len(torch.unique(torch.round(q[0, 0] / step[0, 0]))) > 20


def test_smoothquant_rejects_packed_or_grouped_settings():
    with pytest.raises(Exception, match="pack"):
        quantize(tiny_model("llama"), {"method": "smoothquant", "pack": True}, _calib())
    with pytest.raises(RecipeError):
        quantize(tiny_model("llama"), {"method": "smoothquannt"}, _calib())


def test_stage_needs_dense_save_format():
    from qingzhou.recipes.stages.quantize import QuantizeStage

    with pytest.raises(ValueError, match="save_format: dense"):
        QuantizeStage.model_validate({"kind": "quantize", "method": "smoothquant"})
    st = QuantizeStage.model_validate({"kind": "quantize", "method": "smoothquant", "save_format": "dense"})
    assert st.settings.alpha == 0.5 and st.settings.bits == 8
