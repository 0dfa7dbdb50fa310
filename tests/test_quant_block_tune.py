"""Block tuning after GPTQ (`GPTQConfig.block_tune_steps`, `compress/quantize/block_tune.py`): it
lowers each layer's output error on the calibration data without changing the file's layout, the
packed model is exactly the tuned one, and with `block_tune_lr=0` only the fp16 scales move."""
from __future__ import annotations

import pytest
import torch

from qingzhou.compress.quantize import quantize
from qingzhou.finetune.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"method": "gptq", "bits": 3, "group_size": 32, "dense_target": 0.0, "batch_size": 4}


def _calib():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 272, (48,), generator=g) for _ in range(16)]


def _run(**extra):
    m = tiny_model("llama")
    torch.manual_seed(0)
    rep = quantize(m, {**BASE, **extra}, _calib())
    return m, rep


@pytest.fixture(scope="module")
def plain():
    return _run()


@pytest.fixture(scope="module")
def tuned():
    return _run(block_tune_steps=40, block_tune_scale_lr=5e-3)


def test_each_layer_output_error_falls_or_gptq_is_kept(tuned):
    _, rep = tuned
    per_layer = {name.split(".mlp")[0].split(".self_attn")[0]: m["block_tune"] for name, m in rep.modules.items()}
    assert len(per_layer) == 2  # the tiny model's two decoder layers
    for layer, bt in per_layer.items():
        assert bt["kept"] == (bt["layer_mse_after"] < bt["layer_mse_before"]), (layer, bt)
    assert any(bt["kept"] and bt["layer_mse_after"] < 0.99 * bt["layer_mse_before"] for bt in per_layer.values()), \
        per_layer


def test_scales_only_keeps_gptq_codes_and_the_layout(plain, tuned):
    (pm, prep), (tm, trep) = plain, tuned
    moved = 0
    for name in prep.modules:
        p, t = pm.get_submodule(name), tm.get_submodule(name)
        assert t.bits == p.bits and t.group_size == p.group_size
        assert torch.equal(t.qzeros, p.qzeros) and torch.equal(t.g_idx, p.g_idx)
        if ".layers.0." in name:  # later layers see tuned inputs, so GPTQ picks other codes there
            assert torch.equal(t.codes(), p.codes())  # the codes stay GPTQ's when block_tune_lr is 0
        moved += not torch.equal(t.scales, p.scales)
    assert moved > 0
    assert trep.linear_bytes_after == prep.linear_bytes_after


def test_tuned_model_is_nearer_the_dense_one_on_the_calibration_tokens(plain, tuned):
    ids = torch.stack(_calib())
    ref = tiny_model("llama")
    with torch.no_grad():
        p = torch.log_softmax(ref(ids).logits.double(), -1)
    kl = {}
    for key, (m, _) in {"plain": plain, "tuned": tuned}.items():
        with torch.no_grad():
            q = torch.log_softmax(m(ids).logits.double(), -1)
        kl[key] = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl["tuned"] < kl["plain"], kl


def test_trained_rounding_moves_codes_by_at_most_one_step(plain):
    pm, prep = plain
    tm, trep = _run(block_tune_steps=40, block_tune_lr=0.05, block_tune_scale_lr=5e-3)
    flipped = 0
    for name, info in trep.modules.items():
        if ".layers.0." not in name or not info["block_tune"]["kept"]:
            continue  # (later layers start from other GPTQ codes: their inputs were tuned)
        a, b = pm.get_submodule(name).codes(), tm.get_submodule(name).codes()
        assert int((a.int() - b.int()).abs().max()) <= 1, name
        flipped += int((a != b).sum())
    assert flipped > 0 or not any(i["block_tune"]["kept"] for n, i in trep.modules.items() if ".layers.0." in n)


def test_packed_layers_hold_exactly_the_tuned_weights(tuned):
    """The engine computed the next layer's inputs from the tuned weights, and the packed file holds
    those same weights: a fake-quant run (pack=False) equals the packed one weight for weight."""
    tm, trep = tuned
    fm, _ = _run(block_tune_steps=40, block_tune_scale_lr=5e-3, pack=False)
    for name in trep.modules:
        assert torch.equal(fm.get_submodule(name).weight.detach().float(), tm.get_submodule(name).dequantize_weight()), name
