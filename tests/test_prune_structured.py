"""Structured pruning: smaller dense models that plain transformers reloads with identical logits,
parameter counts that drop by the expected amount, and importance scores that pick the right units."""
from __future__ import annotations

import pytest
import torch

from qingzhou.compress.prune.structured import structured_prune
from qingzhou.finetune.testing import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def calib(n=6, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 272, (length,), generator=g) for _ in range(n)]


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pruned_model_saves_and_reloads_with_plain_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from qingzhou.finetune.testing import byte_tokenizer
    from qingzhou.llm import save_model

    model = tiny_model(arch, num_hidden_layers=3)
    before = n_params(model)
    report = structured_prune(model, {"heads": 0.5, "mlp": 0.25, "layers": 1}, calib())
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (2, 2, 1, 96)
    # per remaining layer: q,o lose 2 heads x 16, k,v lose 1 x 16 (hidden 64); MLP loses 32 channels x 3 x 64
    bias = (2 * 16 + 16 + 16) if arch == "qwen2" else 0
    per_layer_before = 4 * 64 * 64 - 2 * 2 * 16 * 64 + 3 * 64 * 128 + 2 * 64 + (64 + 32 + 32 if arch == "qwen2" else 0)
    attn_after = 2 * (32 * 64) + 2 * (16 * 64)
    mlp_after = 3 * 64 * 96
    per_layer_after = attn_after + mlp_after + 2 * 64 + bias
    assert report.parameters_before == before
    assert report.parameters_after == n_params(model) == before - 3 * per_layer_before + 2 * per_layer_after
    ids = calib(2, 24, seed=5)
    batch = torch.stack(ids)
    with torch.no_grad():
        expected = model(batch).logits
    save_model(model, byte_tokenizer(), tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32).eval()
    assert n_params(reloaded) == report.parameters_after
    with torch.no_grad():
        got = reloaded(batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():  # the KV cache (indexed by layer_idx) works after removing a layer
        out = reloaded.generate(batch[:1, :8], max_new_tokens=4, do_sample=False)
        ref = model.generate(batch[:1, :8], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


def test_importance_removes_exactly_the_dead_units():
    """Units that contribute nothing (a KV group whose o_proj columns are zero, MLP channels whose
    down_proj columns are zero, a layer whose attention and MLP write nothing) must be the ones
    removed - and then the logits do not change at all."""
    model = tiny_model("llama", num_hidden_layers=3, seed=3)
    hd = 16
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            dead_group = i % 2  # KV group i%2 = query heads 2g, 2g+1
            layer.self_attn.o_proj.weight[:, dead_group * 2 * hd : (dead_group + 1) * 2 * hd] = 0
            layer.mlp.down_proj.weight[:, torch.arange(i, 128, 4)] = 0  # 32 dead channels
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    batch = torch.stack(calib(2, 24, seed=9))
    with torch.no_grad():
        dense = model(batch).logits
    report = structured_prune(model, {"heads": 0.5, "mlp": 0.25, "layers": 1}, calib())
    assert report.removed_layers == [1]
    assert report.layer_importance[1] == pytest.approx(0.0, abs=1e-3)
    assert min(report.layer_importance[0], report.layer_importance[2]) > 0.01
    assert report.kept_kv_groups[0] == [1] and report.kept_kv_groups[2] == [1]  # group 0 was dead
    with torch.no_grad():
        pruned = model(batch).logits
    torch.testing.assert_close(pruned, dense, rtol=0, atol=1e-5)


def test_mlp_multiple_and_layers_only():
    model = tiny_model("qwen2", num_hidden_layers=4)
    report = structured_prune(model, {"mlp": 0.3, "mlp_multiple": 16}, calib())
    assert model.config.intermediate_size == 80  # 128 - 38 = 90 -> 80
    assert report.shape_after["intermediate"] == 80 and report.removed_layers == []
    model = tiny_model("qwen2", num_hidden_layers=4)
    report = structured_prune(model, {"layers": 2}, calib())
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert len(model.config.layer_types) == 2
    assert len(report.removed_layers) == 2
    imp = report.layer_importance
    assert all(imp[r] <= min(imp[k] for k in range(4) if k not in report.removed_layers) for r in report.removed_layers)


def test_nothing_left_is_an_error():
    from qingzhou.errors import RecipeError

    with pytest.raises(RecipeError, match="nothing would be left"):
        structured_prune(tiny_model("llama"), {"layers": 2}, calib())


def test_explicit_drop_layers_removes_those_layers_without_calibration():
    """`drop_layers` (a fit plan's choice) removes exactly those layers, keeps the others' weights
    and order, needs no calibration data, and refuses indices that are not this model's."""
    import torch

    from qingzhou.errors import RecipeError

    model = tiny_model("llama", num_hidden_layers=4)
    before = [layer.mlp.down_proj.weight.clone() for layer in model.model.layers]
    report = structured_prune(model, {"drop_layers": [2, 0]})  # no calibration given
    assert report.removed_layers == [0, 2] and model.config.num_hidden_layers == 2
    assert all(torch.equal(layer.mlp.down_proj.weight, before[i]) for layer, i in zip(model.model.layers, (1, 3)))
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    for bad in ([4], [1, 1], [0, 1, 2, 3]):
        with pytest.raises(RecipeError, match="drop_layers"):
            structured_prune(tiny_model("llama", num_hidden_layers=4), {"drop_layers": bad})
    with pytest.raises(RecipeError, match="drop_layers"):
        structured_prune(tiny_model("llama", num_hidden_layers=4), {"drop_layers": [1], "layers": 1}, calib())
