"""bitsandbytes NF4/FP4/int8 on CPU: in-memory `quantize`, the load-time path, save -> load_model, device errors."""
from __future__ import annotations

import pytest
import torch

from qingzhou.compress.quantize.bnb import BnbConfig, load_bnb, to_transformers
from qingzhou.errors import DeviceError
from qingzhou.llm import devices

needs_bnb_cpu = pytest.mark.skipif(not devices.capabilities("cpu").bitsandbytes,
                                   reason="needs bitsandbytes >= 0.46 (CPU backend)")
# relative logit error ||q - fp32|| / ||fp32|| of a tiny random Llama, measured over seeds 0-4 with
# bitsandbytes 0.50.2: nf4 0.091-0.101, fp4 0.119-0.137, int8 0.0075-0.0087
BOUND = {"nf4": 0.13, "fp4": 0.18, "int8": 0.015}
LAYER = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(5, 260, (2, 32))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("qt,bits", [("nf4", 4), ("fp4", 4), ("int8", 8)])
def test_config_maps_to_transformers(qt, bits):
    cfg = BnbConfig(quant_type=qt, skip=["mlp.down_proj"], compute_dtype="float16")
    assert cfg.bits == bits
    t = to_transformers(cfg)
    assert (t.load_in_4bit, t.load_in_8bit) == (bits == 4, bits == 8)
    assert t.llm_int8_skip_modules == ["lm_head", "mlp.down_proj"]
    if bits == 4:
        assert t.bnb_4bit_quant_type == qt and t.bnb_4bit_use_double_quant
        assert t.bnb_4bit_compute_dtype == torch.float16
    exact = to_transformers(cfg, keep=["lm_head", "model.layers.0.mlp.down_proj"])
    assert exact.llm_int8_skip_modules == ["lm_head", r"model\.layers\.0\.mlp\.down_proj"]
    assert to_transformers(BnbConfig(compute_dtype="auto"), device="cpu").bnb_4bit_compute_dtype == torch.float32


def test_unknown_quant_type_is_rejected():
    with pytest.raises(ValueError, match="quant_type"):
        BnbConfig(quant_type="nf3")


@needs_bnb_cpu
@pytest.mark.parametrize("qt", ["nf4", "fp4", "int8"])
def test_in_memory_quantize_is_close_to_fp32_and_reloads(qt, ids, tmp_path):
    from qingzhou.compress.quantize import quantize
    from qingzhou.finetune.testing import byte_tokenizer, tiny_model
    from qingzhou.llm import load_model, save_model

    model = tiny_model("llama")
    ref = _logits(model, ids)
    report = quantize(model, {"method": "bnb", "quant_type": qt, "device": "cpu", "compute_dtype": "float32"})
    out = _logits(model, ids)
    assert _rel(out, ref) < BOUND[qt]
    assert len(report.modules) == 14 and not report.warnings  # 7 linears x 2 decoder layers
    assert type(model.model.layers[1].mlp.down_proj).__name__ == LAYER[qt]
    assert type(model.lm_head) is torch.nn.Linear  # lm_head stays dense
    # packed 4-bit weights + fp32 block scales: about 1/5 of fp32; int8 + row scales about 1/4
    assert report.linear_bytes_after < report.linear_bytes_before * (0.2 if qt != "int8" else 0.27)
    save_model(model, byte_tokenizer(), tmp_path / "q")
    again, _ = load_model(str(tmp_path / "q"), dtype="float32", device="cpu")
    assert type(again.model.layers[1].mlp.down_proj).__name__ == LAYER[qt]
    assert torch.equal(_logits(again, ids), out)


@needs_bnb_cpu
def test_nf4_beats_fp4_on_normal_weights(ids):
    """NF4's levels are normal quantiles, so on (random normal) weights it beats FP4 - and int8 both."""
    from qingzhou.compress.quantize import quantize
    from qingzhou.finetune.testing import tiny_model

    errors = {}
    for qt in ("nf4", "fp4", "int8"):
        model = tiny_model("llama", seed=3)
        ref = _logits(model, ids)
        quantize(model, {"method": "bnb", "quant_type": qt, "device": "cpu"})
        errors[qt] = _rel(_logits(model, ids), ref)
    assert errors["int8"] < errors["nf4"] < errors["fp4"], errors


@needs_bnb_cpu
def test_skip_and_overrides_keep_layers_dense(ids):
    from qingzhou.compress.quantize import quantize
    from qingzhou.finetune.testing import tiny_model

    model = tiny_model("llama")
    report = quantize(model, {"method": "bnb", "device": "cpu", "skip": [r"\.down_proj$"],
                              "overrides": [{"pattern": r"layers\.0\.self_attn\.q_proj", "skip": True}]})
    assert len(report.modules) == 14 - 2 - 1
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "Linear4bit"
    skipped = model.config.quantization_config.llm_int8_skip_modules
    assert r"model\.layers\.0\.self_attn\.q_proj" in skipped and "lm_head" in skipped


@needs_bnb_cpu
@pytest.mark.parametrize("qt", ["nf4", "int8"])
def test_load_time_path_matches_in_memory(qt, tiny_llama_dir, ids):
    """`load_bnb` (transformers quantises while loading) quantises the same layers the same way."""
    from qingzhou.compress.quantize import quantize
    from qingzhou.llm import load_model

    loaded, _ = load_bnb(str(tiny_llama_dir), {"quant_type": qt, "device": "cpu", "compute_dtype": "float32"})
    dense, _ = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    quantize(dense, {"method": "bnb", "quant_type": qt, "device": "cpu", "compute_dtype": "float32"})
    kinds = lambda m: {n: type(x).__name__ for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)}  # noqa: E731
    assert kinds(loaded) == kinds(dense)
    assert torch.allclose(_logits(loaded, ids), _logits(dense, ids), atol=1e-6)


@needs_bnb_cpu
def test_quantize_stage_saves_a_model_load_model_reads(tmp_path, tiny_llama_dir, ids):
    from qingzhou.llm import load_model
    from qingzhou.recipes.runner import run_recipe
    from qingzhou.recipes.schema import validate_recipe

    recipe = validate_recipe({"name": "t", "stages": [
        {"kind": "load", "model": str(tiny_llama_dir), "dtype": "float32", "device": "cpu"},
        {"kind": "quantize", "method": "bnb", "quant_type": "nf4", "device": "cpu", "compute_dtype": "float32"}]})
    run_recipe(recipe, tmp_path / "run", progress=False)
    folder = next((tmp_path / "run").glob("*-quantize")) / "model"
    model, _ = load_model(str(folder), dtype="float32", device="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    expected, _ = load_bnb(str(tiny_llama_dir), {"device": "cpu", "compute_dtype": "float32"})
    assert torch.equal(_logits(model, ids), _logits(expected, ids))


@needs_bnb_cpu
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_4bit_layer_keeps_its_layout_computes_in_fp32_and_trains_after_eval(qt):
    """bitsandbytes >= 0.49 on an AVX512-BF16 CPU repacks a 4-bit weight in place at its first
    no-grad eval forward (bf16 kernel, no backward). qingzhou's layers keep the reference layout:
    the codes do not move, the output is the fp32 matmul with the dequantised weight, and a
    training step after evaluation still sends gradients to the input."""
    from qingzhou.compress.quantize.bnb import BnbConfig, bnb_linear, import_bitsandbytes

    bnb = import_bitsandbytes()
    torch.manual_seed(0)
    layer = bnb_linear(torch.nn.Linear(128, 64, bias=True), BnbConfig(quant_type=qt, compute_dtype="float32"), "cpu")
    codes, x = layer.weight.data.clone(), torch.randn(3, 128)
    with torch.no_grad():
        out = layer.eval()(x)
    assert torch.equal(layer.weight.data, codes)
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.allclose(out, torch.nn.functional.linear(x, dense, layer.bias), atol=1e-5)
    x.requires_grad_(True)
    layer.train()(x).sum().backward()
    assert torch.allclose(x.grad, dense.sum(0).expand_as(x), atol=1e-4)


def test_unsupported_device_and_missing_install_are_device_errors(monkeypatch):
    from qingzhou.compress.quantize import quantize
    from qingzhou.finetune.testing import tiny_model

    with pytest.raises(DeviceError, match="npu"):
        quantize(tiny_model("llama"), {"method": "bnb", "device": "npu"})
    monkeypatch.setattr(devices, "bitsandbytes_version", lambda: None)
    with pytest.raises(DeviceError, match="bitsandbytes is not supported on device 'cpu'") as e:
        quantize(tiny_model("llama"), {"method": "bnb", "device": "cpu"})
    assert "pip install" in e.value.render()
    monkeypatch.setattr(devices, "bitsandbytes_version", lambda: (0, 45, 0))
    with pytest.raises(DeviceError, match="needs >= 0.46"):
        quantize(tiny_model("llama"), {"method": "bnb", "device": "cpu"})


def test_stage_validates_bnb_settings():
    from qingzhou.recipes.stages.quantize import QuantizeStage

    st = QuantizeStage.model_validate({"kind": "quantize", "method": "bnb", "quant_type": "int8"})
    assert st.settings.bits == 8 and st.settings.method == "bnb"
