"""bitsandbytes: configs map to transformers' BitsAndBytesConfig; without bnb/CUDA a DeviceError."""
from __future__ import annotations

import importlib.util

import pytest

from qingzhou.compress.quantize.bnb import BnbConfig, load_bnb, to_transformers
from qingzhou.errors import DeviceError, RecipeError

needs_no_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None,
                                  reason="bitsandbytes is installed here")


@pytest.mark.parametrize("qt,bits", [("nf4", 4), ("fp4", 4), ("int8", 8)])
def test_config_maps_to_transformers(qt, bits):
    import torch

    cfg = BnbConfig(quant_type=qt, skip=["mlp.down_proj"], compute_dtype="float16")
    assert cfg.bits == bits
    t = to_transformers(cfg)
    assert (t.load_in_4bit, t.load_in_8bit) == (bits == 4, bits == 8)
    assert t.llm_int8_skip_modules == ["lm_head", "mlp.down_proj"]
    if bits == 4:
        assert t.bnb_4bit_quant_type == qt and t.bnb_4bit_use_double_quant
        assert t.bnb_4bit_compute_dtype == torch.float16


def test_unknown_quant_type_is_rejected():
    with pytest.raises(ValueError, match="quant_type"):
        BnbConfig(quant_type="nf3")


def test_cpu_raises_device_error_naming_cuda(tiny_llama_dir):
    with pytest.raises(DeviceError, match="bitsandbytes.*cpu") as e:
        load_bnb(str(tiny_llama_dir), {"quant_type": "nf4", "device": "cpu"})
    assert "cuda" in (e.value.hint or "")


@needs_no_bnb
def test_missing_install_raises_device_error_on_cuda_too(tiny_llama_dir):
    with pytest.raises(DeviceError, match="not installed|not supported") as e:
        load_bnb(str(tiny_llama_dir), {"quant_type": "nf4", "device": "cuda"})
    assert "pip install" in e.value.render()


def test_quantize_entry_point_gives_the_device_error_first():
    from qingzhou.compress.quantize import quantize
    from qingzhou.finetune.testing import tiny_model

    with pytest.raises((DeviceError, RecipeError)) as e:
        quantize(tiny_model("llama"), {"method": "bnb", "device": "cpu"})
    assert isinstance(e.value, DeviceError)


def test_stage_validates_bnb_settings():
    from qingzhou.recipes.stages.quantize import QuantizeStage

    st = QuantizeStage.model_validate({"kind": "quantize", "method": "bnb", "quant_type": "int8"})
    assert st.settings["bits"] == 8 and st.settings["method"] == "bnb"
