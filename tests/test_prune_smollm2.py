"""Pruning the real SmolLM2-135M (GGUF): N:M exactness and a structurally pruned model that plain
transformers reloads with the same logits. Few calibration tokens: these check plumbing on a real
architecture (GQA 9/3 heads, tied embeddings, 30 layers); quality numbers live in bench/prune_quality.py."""
from __future__ import annotations

import copy

import pytest
import torch

from qingzhou.compress.prune import prune
from qingzhou.compress.prune.masks import is_nm

pytestmark = pytest.mark.integration


def _calib(tok, n=4, length=128):
    text = ("The river flows past the old mill, where the miller grinds wheat into flour for the town. " * 40)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def test_smollm2_wanda_2_4(smollm2):
    model, tok = smollm2
    model = copy.deepcopy(model)
    report = prune(model, {"method": "wanda", "nm": "2:4", "device": "cpu"}, _calib(tok))
    assert len(report.modules) == 30 * 7
    for name in report.modules:
        assert is_nm(model.get_submodule(name).weight, 2, 4), name
    assert report.sparsity == pytest.approx(0.5, abs=1e-4)  # the Q4_1 grid already holds a few zeros
    assert torch.equal(model.lm_head.weight, smollm2[0].lm_head.weight)  # tied embeddings untouched


def test_smollm2_structured_reloads_with_plain_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from qingzhou.llm import save_model

    model, tok = smollm2
    model = copy.deepcopy(model)
    report = prune(model, {"method": "structured", "heads": 1 / 3, "mlp": 0.25, "mlp_multiple": 64,
                           "layers": 2, "device": "cpu"}, _calib(tok))
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (28, 6, 2, 1152)
    # per layer: q,o lose 3 heads x 64 x 576, k,v lose 64 x 576 each; MLP loses 384 x 3 x 576
    per_layer_cut = 2 * 3 * 64 * 576 + 2 * 64 * 576 + 384 * 3 * 576
    dense_layer = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536 + 2 * 576
    assert report.parameters_before - report.parameters_after == 28 * per_layer_cut + 2 * dense_layer
    ids = _calib(tok, 1, 64)[0][None]
    with torch.no_grad():
        expected = model(ids).logits
    save_model(model, tok, tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
