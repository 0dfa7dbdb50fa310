"""quantize -> save (GPTQ layout) -> load gives the same logits; plans, overrides, config errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qingzhou.compress.quantize import QuantLinear, load_quantized, quantize, save_quantized
from qingzhou.errors import RecipeError
from qingzhou.finetune.testing import tiny_model


def _calib(n=8, length=32, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 272, (length,), generator=g) for _ in range(n)]


IDS = torch.tensor([[3, 17, 99, 250, 42, 7, 7, 130], [11, 12, 13, 14, 15, 16, 17, 18]])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_load_same_logits(arch, tmp_path):
    model = tiny_model(arch)
    cfg = {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True,
           "overrides": [{"pattern": r"mlp\.down_proj", "bits": 8, "group_size": 64},
                         {"pattern": r"layers\.1\.self_attn\.k_proj", "bits": 3},
                         {"pattern": r"layers\.0\.self_attn\.o_proj", "skip": True}]}
    report = quantize(model, cfg, _calib())
    assert len(report.modules) == 13 and report.skipped == ["model.layers.0.self_attn.o_proj"]
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    with torch.no_grad():
        before = model(IDS).logits
    save_quantized(model, None, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["desc_act"] is True
    # asymmetric: the v2 zero-point convention (qzeros = zero), which GPTQModel accepts from any writer
    assert qc["checkpoint_format"] == "gptq_v2" and qc["sym"] is False
    assert qc["dynamic"][r"-:^model\.layers\.0\.self_attn\.o_proj$"] == {}
    assert qc["dynamic"][r"+:^model\.layers\.0\.mlp\.down_proj$"]["bits"] == 8
    sd = load_file(tmp_path / "q" / "model.safetensors")
    p = "model.layers.0.self_attn.q_proj"
    assert sd[f"{p}.qweight"].dtype == torch.int32 and sd[f"{p}.qweight"].shape == (64 * 4 // 32, 64)
    assert sd[f"{p}.qzeros"].shape == (2, 64 * 4 // 32) and sd[f"{p}.scales"].dtype == torch.float16
    assert sd[f"{p}.g_idx"].shape == (64,)
    assert sd["model.layers.1.self_attn.k_proj.qweight"].shape == (64 * 3 // 32, 32)
    assert sd["model.layers.0.mlp.down_proj.qweight"].shape == (128 * 8 // 32, 64)
    assert "model.layers.0.self_attn.o_proj.weight" in sd
    loaded = load_quantized(tmp_path / "q")
    assert loaded.model.layers[1].self_attn.k_proj.bits == 3
    with torch.no_grad():
        after = loaded(IDS).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    if arch == "qwen2":  # q/k/v biases survive
        assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    # a resident load keeps its 4-bit codes once, in the kernel's pack, and saves the same tensors
    four = [m for m in loaded.modules() if isinstance(m, QuantLinear) and m.bits == 4]
    assert four and all(m.is_compact() for m in four)
    assert not any(m.is_compact() for m in loaded.modules() if isinstance(m, QuantLinear) and m.bits != 4)
    save_quantized(loaded, None, tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)


def test_packed_equals_fake_quant():
    dense, packed = tiny_model("llama"), tiny_model("llama")
    cfg = {"method": "rtn", "bits": 3, "group_size": 32}
    quantize(dense, {**cfg, "pack": False})
    rep = quantize(packed, cfg)
    assert rep.linear_bytes_after < rep.linear_bytes_before / 5
    with torch.no_grad():
        torch.testing.assert_close(packed(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-5)


def test_indivisible_group_size_policies(tmp_path):
    with pytest.raises(RecipeError, match="does not divide the input width 64"):
        quantize(tiny_model("llama"), {"method": "rtn", "group_size": 48, "on_indivisible_group": "error"})
    m = tiny_model("llama")
    rep = quantize(m, {"method": "rtn", "group_size": 48, "on_indivisible_group": "per_channel"})
    assert rep.modules["model.layers.0.self_attn.q_proj"]["group_size"] == -1
    assert rep.modules["model.layers.0.mlp.down_proj"]["group_size"] == -1  # 128 % 48 != 0 either
    m = tiny_model("llama")
    quantize(m, {"method": "gptq", "group_size": 48, "on_indivisible_group": "ragged"}, _calib())
    assert m.model.layers[0].self_attn.q_proj.scales.shape[0] == 2
    with torch.no_grad():
        before = m(IDS).logits
    save_quantized(m, None, tmp_path / "r")
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "r")(IDS).logits, before, rtol=0, atol=1e-5)


def test_config_errors_name_the_problem():
    with pytest.raises(RecipeError, match="unknown quantization method 'gptqq'.*gptq"):
        quantize(tiny_model("llama"), {"method": "gptqq"})
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="bits"):
        quantize(tiny_model("llama"), {"method": "rtn", "bits": 9})
    with pytest.raises(ValidationError, match="extra"):
        quantize(tiny_model("llama"), {"method": "rtn", "bitz": 4})


def test_stage_config_validates_flat_method_keys():
    from pydantic import ValidationError

    from qingzhou.recipes.stages.quantize import QuantizeStage

    s = QuantizeStage.model_validate({"kind": "quantize", "method": "gptq", "bits": 3, "group_size": 64,
                                      "calibration": {"num_samples": 16}})
    assert s.settings.bits == 3 and s.settings.calibration.num_samples == 16
    assert s.settings.act_order is True
    with pytest.raises(ValidationError, match="bitz"):
        QuantizeStage.model_validate({"kind": "quantize", "method": "gptq", "bitz": 4})


def test_builtin_calibration_loads_offline():
    from qingzhou.data.calibration import CalibrationConfig, load_calibration
    from qingzhou.finetune.testing import byte_tokenizer

    samples = load_calibration(byte_tokenizer(), CalibrationConfig(num_samples=4, seq_len=256, seed=3))
    again = load_calibration(byte_tokenizer(), CalibrationConfig(num_samples=4, seq_len=256, seed=3))
    assert len(samples) == 4 and all(s.shape == (256,) for s in samples)
    assert all(torch.equal(a, b) for a, b in zip(samples, again))  # fixed seed -> same samples
