"""Merged LoRA/DoRA/IA3 models give the adapter's logits; prompt-tuning adapters are kept, with a reason."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qingzhou.data import DataConfig, prepare_data
from qingzhou.errors import ModelLoadError
from qingzhou.finetune import export_merged, finetune
from qingzhou.finetune.testing import byte_tokenizer, tiny_model

ROWS = [{"instruction": f"Tariff for zone {i}?", "output": f"[ok] {i * 3} cents"} for i in range(12)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = byte_tokenizer()
    data = prepare_data(DataConfig(source="<records>", eval_fraction=0, cache=False), tok, records=ROWS)
    return tok, data


@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("qwen2", "dora"), ("llama", "rslora"), ("qwen2", "ia3")])
def test_merged_logits_equal_adapter_logits(arch, method, setup, tmp_path):
    torch.set_num_threads(1)
    tok, data = setup
    base_dir = tmp_path / "base"
    tiny_model(arch).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lr = 3e-1 if method == "ia3" else 1e-2
    result = finetune(model, tok, data, {"method": method, "max_steps": 10, "batch_size": 4, "learning_rate": lr, "progress": False},
                      output_dir=tmp_path / "ft")
    ids = torch.tensor([data.train[0].input_ids])
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), result.artifact_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    out = export_merged(result.artifact_dir, tmp_path / "merged", base_model=str(base_dir))
    assert out.merged and (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        la, lm, lb = adapted(ids).logits, merged(ids).logits, base(ids).logits
    assert (la - lm).abs().max() < 1e-4
    assert (la - lb).abs().max() > 1e-3  # the adapter changed the model, so the check has teeth
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_adapters_are_copied_with_a_reason(method, setup, tmp_path):
    tok, data = setup
    result = finetune(tiny_model("llama"), tok, data, {"method": method, "max_steps": 2, "progress": False}, output_dir=tmp_path / "ft")
    out = export_merged(result.artifact_dir, tmp_path / "out")
    assert not out.merged
    assert "cannot be merged" in out.message and "virtual tokens" in out.message
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_export_of_non_adapter_folder_is_a_clear_error(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="full model"):
        export_merged(tmp_path / "m", tmp_path / "out")
    with pytest.raises(ModelLoadError, match="adapter_config"):
        export_merged(tmp_path, tmp_path / "out")
