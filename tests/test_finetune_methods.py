"""Every fine-tuning method lowers the loss of a tiny fixed data set on tiny random Llama and Qwen2."""
from __future__ import annotations

import json

import pytest
import torch

from qingzhou.data import DataConfig, prepare_data
from qingzhou.errors import RecipeError
from qingzhou.finetune import METHODS, finetune, parse_finetune_config
from qingzhou.finetune.testing import byte_tokenizer, memorise_data, tiny_model
from qingzhou.llm import devices

ROWS = [{"instruction": f"Capital of {c}?", "output": f"[ok] {a}"} for c, a in [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Chad", "Ndjamena"),
    ("Cuba", "Havana"), ("Iraq", "Baghdad"), ("Mali", "Bamako"), ("Laos", "Vientiane")]]
# learning rate and the loss ratio (after / before, on the training rows) each method must reach in 30 steps;
# a random tiny model starts near uniform (ln 261 = 5.56), so prompt-side methods move it least
PLAN = {
    "full": (1e-3, 0.75), "lora": (5e-3, 0.9), "dora": (5e-3, 0.9), "rslora": (2e-3, 0.9),
    "ia3": (3e-1, 0.97), "prompt_tuning": (3e-1, 0.99), "prefix_tuning": (2e-2, 0.96), "p_tuning": (1e-1, 0.97),
    "qlora": (5e-3, 0.9),  # NF4 base on CPU (bitsandbytes >= 0.46); measured 0.84 on Llama
    "quant_scales": (3e-2, 0.97),  # a 3-bit RTN copy's group scales only
}
needs_bnb_cpu = pytest.mark.skipif(not devices.capabilities("cpu").bitsandbytes, reason="needs bitsandbytes >= 0.46 (CPU backend)")
METHOD_PARAMS = [pytest.param(m, marks=needs_bnb_cpu) if m == "qlora" else m for m in sorted(PLAN)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def fixed_data(tok):
    return memorise_data(tok, ROWS)


def test_every_registered_method_has_a_plan():
    assert set(METHODS) == set(PLAN)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHOD_PARAMS)
def test_loss_goes_down(method, arch, tok, fixed_data, tmp_path):
    torch.set_num_threads(1)
    lr, ratio = PLAN[method]
    model = tiny_model(arch)
    if method == "quant_scales":  # trains a quantized model
        from qingzhou.compress.quantize import quantize

        quantize(model, {"method": "rtn", "bits": 3, "group_size": 32})
    result = finetune(model, tok, fixed_data,
                      {"method": method, "max_steps": 30, "batch_size": 4, "learning_rate": lr, "warmup_ratio": 0, "progress": False},
                      output_dir=tmp_path)
    assert result.eval_loss_after < result.eval_loss_before * ratio, (result.eval_loss_before, result.eval_loss_after)
    assert result.train_loss[-1][1] < result.train_loss[0][1]
    assert 0 < result.trainable_params <= result.total_params
    art = tmp_path / result.artifact
    if result.artifact == "model":
        assert (art / "model.safetensors").is_file() and (art / "config.json").is_file()
    else:
        assert (art / "adapter_model.safetensors").is_file()
        assert result.trainable_params < result.total_params / 2
    assert (art / "tokenizer_config.json").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["steps"] == 30


def test_grad_accum_matches_bigger_batch(tok, fixed_data, tmp_path):
    """Loss is normalised over the whole optimizer step, so 2x4 accumulation == one batch of 8."""
    torch.set_num_threads(1)
    common = {"method": "lora", "max_steps": 3, "learning_rate": 5e-3, "dropout": 0.0, "progress": False}
    a = finetune(tiny_model("llama"), tok, fixed_data, {**common, "batch_size": 8}, output_dir=tmp_path / "a")
    b = finetune(tiny_model("llama"), tok, fixed_data, {**common, "batch_size": 4, "grad_accum": 2}, output_dir=tmp_path / "b")
    # same rows per step only within an epoch of 8 rows: both see all 8 rows every step
    for (_, la), (_, lb) in zip(a.train_loss, b.train_loss):
        assert abs(la - lb) < 1e-4


def test_pretraining_text_with_packing_and_checkpointing(tok, tmp_path):
    torch.set_num_threads(1)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the grid balances supply and demand every second."] * 30), encoding="utf-8")
    cfg = DataConfig(source=str(corpus), packing=True, max_length=128, eval_fraction=0.1, cache=False)
    result = finetune(tiny_model("qwen2"), tok, cfg,
                      {"method": "full", "max_steps": 15, "batch_size": 2, "learning_rate": 2e-3, "gradient_checkpointing": True,
                       "scheduler": "linear", "progress": False}, output_dir=tmp_path / "out")
    assert result.data["format"] == "text"
    assert result.eval_loss_after < 0.8 * result.eval_loss_before


def test_config_errors_are_recipe_errors():
    with pytest.raises(RecipeError, match="Did you mean 'lora'"):
        parse_finetune_config({"method": "lroa"})
    with pytest.raises(RecipeError, match="r"):
        parse_finetune_config({"method": "lora", "r": 0})
    with pytest.raises(RecipeError, match="num_virtual_tokens|Extra"):
        parse_finetune_config({"method": "lora", "num_virtual_tokens": 3})
    assert parse_finetune_config({"method": "prompt_tuning"}).learning_rate == 3e-2


def test_prompt_methods_refuse_packing(tok, tmp_path):
    data = prepare_data(DataConfig(source="<records>", packing=True, max_length=128, cache=False), tok, records=ROWS)
    with pytest.raises(RecipeError, match="packing"):
        finetune(tiny_model("llama"), tok, data, {"method": "prompt_tuning", "max_steps": 1, "progress": False}, output_dir=tmp_path)
