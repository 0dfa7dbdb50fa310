"""QLoRA (NF4 base + LoRA) and bitsandbytes' 8-bit optimizers through the one loop, on CPU."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qingzhou.errors import DeviceError, RecipeError
from qingzhou.finetune import finetune, parse_finetune_config
from qingzhou.finetune.testing import byte_tokenizer, memorise_data, tiny_model
from qingzhou.llm import devices

needs_bnb_cpu = pytest.mark.skipif(not devices.capabilities("cpu").bitsandbytes,
                                   reason="needs bitsandbytes >= 0.46 (CPU backend)")
ROWS = [{"instruction": f"Relay setting {i}?", "output": f"[ok] trip at {i * 7 % 13} A"} for i in range(16)]
IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100]])


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    return memorise_data(tok, ROWS)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@needs_bnb_cpu
def test_qlora_adapter_saves_and_reloads(tok, data, tiny_llama_dir, tmp_path):
    """The adapter reloads onto a fresh NF4 base exactly, onto the fp32 base (load_model, export
    merge) within NF4's error; the trained layers are peft's bitsandbytes LoRA layers."""
    from peft import PeftModel

    from qingzhou.finetune import export_merged
    from qingzhou.finetune.qlora import quantize_base_4bit
    from qingzhou.llm import load_model

    torch.set_num_threads(1)
    base, _ = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    res = finetune(base, tok, data, {"method": "qlora", "max_steps": 20, "batch_size": 4, "learning_rate": 5e-3,
                                     "dropout": 0.0, "progress": False}, output_dir=tmp_path / "ft", base_source=str(tiny_llama_dir))
    assert res.eval_loss_after < 0.9 * res.eval_loss_before
    q_proj = res.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__ == "peft.tuners.lora.bnb" and type(q_proj.base_layer).__name__ == "Linear4bit"
    res.model.eval()
    trained = _logits(res.model)
    adapter = tmp_path / "ft" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama_dir)

    fresh, _ = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    reloaded = PeftModel.from_pretrained(quantize_base_4bit(fresh, compute_dtype="float32"), str(adapter)).eval()
    assert torch.allclose(_logits(reloaded), trained, atol=1e-5)

    on_fp32, _ = load_model(str(adapter), dtype="float32", device="cpu")
    fp32_logits = _logits(on_fp32)
    assert float((fp32_logits - trained).norm() / trained.norm()) < 0.13  # NF4's logit error bound (test_quant_bnb)
    merged = export_merged(adapter, tmp_path / "merged")
    assert merged.merged
    plain, _ = load_model(str(tmp_path / "merged"), dtype="float32", device="cpu")
    assert torch.allclose(_logits(plain), fp32_logits, atol=1e-4)


@needs_bnb_cpu
def test_adamw_8bit_keeps_8bit_state_lowers_loss_and_resumes(tok, data, tmp_path):
    """Full fine-tuning with AdamW8bit: the checkpointed moments are uint8 (bitsandbytes keeps
    tensors under 4096 elements in fp32, the 272x64 embeddings are above), loss goes down, and a
    crashed run resumes to the same weights as an uninterrupted one."""
    torch.set_num_threads(1)
    cfg = {"method": "full", "optimizer": "adamw_8bit", "max_steps": 8, "batch_size": 4, "learning_rate": 2e-3,
           "save_every": 4, "warmup_ratio": 0, "progress": False}
    straight = finetune(tiny_model("llama"), tok, data, cfg, output_dir=tmp_path / "straight")
    assert straight.eval_loss_after < 0.85 * straight.eval_loss_before
    state = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000004" / "optimizer.safetensors"))
    assert any(v.dtype == torch.uint8 for k, v in state.items() if k.endswith("state1"))

    def crash(step, metrics):
        if step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        finetune(tiny_model("llama"), tok, data, cfg, output_dir=tmp_path / "crashed", callbacks=[crash])
    resumed = finetune(tiny_model("llama", seed=123), tok, data, cfg, output_dir=tmp_path / "crashed")
    assert resumed.resumed_from == 4
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "model" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@needs_bnb_cpu
@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "paged_lion_8bit"])
def test_other_bitsandbytes_optimizers_lower_loss(optimizer, tok, data, tmp_path):
    """Paged variants run unpaged on CPU (bitsandbytes falls back); Lion takes a smaller step."""
    torch.set_num_threads(1)
    lr = 1e-3 if "lion" in optimizer else 2e-3
    res = finetune(tiny_model("llama"), tok, data, {"method": "full", "optimizer": optimizer, "max_steps": 8, "batch_size": 4,
                                                    "learning_rate": lr, "warmup_ratio": 0, "progress": False},
                   output_dir=tmp_path)
    assert res.eval_loss_after < 0.9 * res.eval_loss_before, (res.eval_loss_before, res.eval_loss_after)


def test_without_bitsandbytes_qlora_and_8bit_optimizers_are_device_errors(tok, data, tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "bitsandbytes_version", lambda: None)
    with pytest.raises(DeviceError, match="QLoRA needs bitsandbytes") as e:
        finetune(tiny_model("llama"), tok, data, {"method": "qlora", "max_steps": 1, "progress": False}, output_dir=tmp_path)
    assert "pip install" in e.value.render()
    with pytest.raises(DeviceError, match="optimizer 'adamw_8bit' needs bitsandbytes"):
        finetune(tiny_model("llama"), tok, data, {"method": "lora", "optimizer": "adamw_8bit", "max_steps": 1, "progress": False},
                 output_dir=tmp_path)


def test_optimizer_names_are_checked_with_a_hint():
    with pytest.raises(RecipeError, match="Did you mean 'paged_adamw_8bit'"):
        parse_finetune_config({"method": "qlora", "optimizer": "paged_adam_8bit"})
    assert parse_finetune_config({"method": "qlora"}).compute_dtype == "auto"


def test_lora_trains_on_a_gptq_packed_base_and_leaves_it_untouched(tok, data, tmp_path):
    """A model quantised by qingzhou (QuantLinear layers, GPTQ layout) takes LoRA through peft's GPTQ
    LoRA layer: loss goes down and the packed 4-bit buffers do not change."""
    from qingzhou.compress.quantize import quantize
    from qingzhou.llm.quantized.qlinear import QuantLinear

    torch.set_num_threads(1)
    model = tiny_model("llama")
    quantize(model, {"method": "rtn", "bits": 4, "group_size": 32})
    packed = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert packed
    res = finetune(model, tok, data, {"method": "lora", "max_steps": 30, "batch_size": 4, "learning_rate": 1e-2,
                                      "dropout": 0.0, "progress": False}, output_dir=tmp_path)
    assert res.eval_loss_after < 0.9 * res.eval_loss_before, (res.eval_loss_before, res.eval_loss_after)
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): m.qweight
             for n, m in res.model.named_modules() if isinstance(m, QuantLinear)}
    assert after.keys() == packed.keys()
    assert all(torch.equal(after[n], packed[n]) for n in packed)
