"""Unstructured and N:M pruning on tiny random models: exact sparsity, exact N:M, Wanda by hand,
SparseGPT's reconstruction beating magnitude and Wanda, skips/overrides, OWL, joint quantisation."""
from __future__ import annotations

import pydantic
import pytest
import torch

from qingzhou.compress.prune import prune
from qingzhou.compress.prune.masks import Target, is_nm
from qingzhou.compress.prune.sparsegpt import sparsegpt_prune_weight
from qingzhou.compress.prune.wanda import wanda_prune_weight
from qingzhou.errors import RecipeError
from qingzhou.finetune.testing import tiny_model

ARCHS = ["llama", "qwen2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def calib(n: int = 8, length: int = 32, vocab: int = 272, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (length,), generator=g) for _ in range(n)]


def planned(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_wanda_rows_have_exact_sparsity(arch, sparsity):
    model = tiny_model(arch)
    report = prune(model, {"method": "wanda", "sparsity": sparsity}, calib())
    weights = planned(model)
    assert len(weights) == 14 and len(report.modules) == 14
    for name, w in weights.items():
        zeros_per_row = (w == 0).sum(dim=1)
        assert (zeros_per_row == int(w.shape[1] * sparsity)).all(), name
    assert report.layers[0]["sparsity"] == pytest.approx(report.modules["model.layers.0.mlp.up_proj"]["sparsity"], abs=0.05)
    assert 0.28 <= report.sparsity <= 0.5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_layer_comparison_has_exact_sparsity(arch, method):
    model = tiny_model(arch)
    prune(model, {"method": method, "sparsity": 0.5, "block_size": 48} if method == "sparsegpt"
          else {"method": method, "sparsity": 0.5}, calib())
    for name, w in planned(model).items():
        assert int((w == 0).sum()) == w.numel() // 2, name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_nm_is_exact_in_every_group(arch, method, nm):
    n, m = map(int, nm.split(":"))
    model = tiny_model(arch)
    report = prune(model, {"method": method, "nm": nm}, calib())
    for name, w in planned(model).items():
        groups = (w.reshape(w.shape[0], -1, m) != 0).sum(dim=2)
        assert (groups == n).all(), name  # random weights: exactly N survive in each group
        assert is_nm(w, n, m)
    assert report.sparsity == pytest.approx(1 - n / m)


def test_wanda_matches_hand_computed_example():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, 2.0, 1.0]])
    X = torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 2.0]])  # tokens x features
    # ||X_j||_2 = [sqrt 2, 0, 2, 2]; scores row 0 = [1.41, 0, 6, 8], row 1 = [5.66, 0, 4, 2]
    mask = wanda_prune_weight(W, (X**2).sum(0), Target(0.5))
    expected = torch.tensor([[0.0, 0.0, 3.0, -4.0], [4.0, 0.0, 2.0, 0.0]])
    assert torch.equal(W.masked_fill(mask, 0), expected)
    # magnitude alone would keep row 1's 3.0 instead of 2.0
    assert not torch.equal(W.masked_fill(W.abs() < W.abs().median(dim=1, keepdim=True).values, 0), expected)


def test_wanda_in_the_engine_uses_the_layer_inputs():
    """Layer 0's q_proj sees the (unpruned) input-layernorm output: its mask must equal a Wanda
    mask computed by hand from that input."""
    model = tiny_model("llama")
    samples = calib()
    seen = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for s in samples:
            model(s[None])
    h.remove()
    X = torch.cat(seen)
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    scores = W.abs() * X.norm(dim=0)[None]
    expected = W.clone()
    idx = scores.argsort(dim=1)[:, : W.shape[1] // 2]
    expected.scatter_(1, idx, 0.0)
    prune(model, {"method": "wanda", "sparsity": 0.5, "batch_size": 3}, samples)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, expected)


def _correlated_inputs(tokens=2048, features=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5
    scale = torch.exp(torch.randn(features, generator=g))  # a few large channels, as in LLMs
    return (torch.randn(tokens, features, generator=g) @ mix + 0.3 * torch.randn(tokens, features, generator=g)) * scale


@pytest.mark.parametrize("target", [Target(0.5), Target(nm=(2, 4)), Target(0.7)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(target):
    from qingzhou.compress.hessian import HessianAccumulator
    from qingzhou.compress.prune.magnitude import magnitude_prune_weight

    X = _correlated_inputs()
    W = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(64, "cpu")
    for chunk in X.split(512):
        acc.add(chunk)
    err = {}
    err["magnitude"] = W.masked_fill(magnitude_prune_weight(W, target), 0)
    err["wanda"] = W.masked_fill(wanda_prune_weight(W, (X**2).sum(0), target), 0)
    res = sparsegpt_prune_weight(W, acc.H, target, block_size=32)
    err["sparsegpt"] = res.weight
    errs = {k: float(torch.linalg.norm(X @ W.T - X @ v.T)) for k, v in err.items()}
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"], errs
    # the OBS update itself must help: the same mask without reconstruction is worse
    masked_only = float(torch.linalg.norm(X @ W.T - X @ W.masked_fill(res.mask, 0).T))
    assert errs["sparsegpt"] < 0.95 * masked_only, (errs, masked_only)
    assert int((res.weight == 0).sum()) == int((res.mask).sum())
    assert torch.equal(res.weight == 0, res.mask)


def test_sparsegpt_model_output_closer_than_magnitude():
    samples = calib(16)
    dense = tiny_model("llama")
    with torch.no_grad():
        ref = torch.cat([dense(s[None]).logits for s in samples])
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_model("llama")
        prune(model, {"method": method, "sparsity": 0.5}, samples)
        with torch.no_grad():
            out = torch.cat([model(s[None]).logits for s in samples])
        errors[method] = float((out - ref).pow(2).mean())
    assert errors["sparsegpt"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["wanda"], errors


def test_skip_and_overrides():
    model = tiny_model("qwen2")
    cfg = {"method": "magnitude", "sparsity": 0.5, "skip": ["lm_head", r"\.0\.self_attn"],
           "overrides": [{"pattern": "down_proj", "sparsity": 0.25}, {"pattern": "gate_proj", "nm": "2:4"},
                         {"pattern": r"layers\.1\.mlp\.up", "skip": True}]}
    report = prune(model, cfg)
    w = planned(model)
    assert (w["model.layers.0.self_attn.q_proj"] != 0).all()
    assert (w["model.layers.1.mlp.up_proj"] != 0).all()
    assert int((w["model.layers.1.mlp.down_proj"] == 0).sum()) == w["model.layers.1.mlp.down_proj"].numel() // 4
    assert is_nm(w["model.layers.0.mlp.gate_proj"], 2, 4)
    assert "model.layers.0.self_attn.v_proj" in report.skipped and len(report.skipped) == 5
    assert report.modules["model.layers.1.mlp.gate_proj"]["target"] == "2:4"
    fresh = tiny_model("qwen2")
    assert torch.equal(model.lm_head.weight, fresh.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, fresh.model.embed_tokens.weight)


def test_owl_gives_non_uniform_layers_with_the_same_mean():
    model = tiny_model("llama", num_hidden_layers=4)
    report = prune(model, {"method": "wanda", "sparsity": 0.5, "owl": {"threshold": 3, "spread": 0.1}}, calib())
    per_layer = report.owl["layer_sparsity"]
    assert len(per_layer) == 4
    assert sum(per_layer.values()) / 4 == pytest.approx(0.5, abs=1e-6)
    assert max(per_layer.values()) - min(per_layer.values()) == pytest.approx(0.2, abs=1e-6)
    for row in report.layers:  # the measured sparsity of each layer follows its OWL target
        assert row["sparsity"] == pytest.approx(per_layer[row["layer"]], abs=0.02)


def test_joint_sparsegpt_quantisation_keeps_mask_and_grid():
    model = tiny_model("llama")
    prune(model, {"method": "sparsegpt", "nm": "2:4", "quantize": {"bits": 3, "group_size": 32}}, calib())
    w = model.model.layers[1].mlp.down_proj.weight.detach()
    assert is_nm(w, 2, 4)
    for g in range(w.shape[1] // 32):
        for row in w[:, g * 32 : (g + 1) * 32]:
            assert torch.unique(row[row != 0]).numel() <= 8  # at most 2**3 grid points per group


def test_bad_configs_fail_before_compute():
    from qingzhou.compress.prune.registry import parse_config

    with pytest.raises(pydantic.ValidationError):
        parse_config({"method": "wanda", "nm": "4:2"})
    with pytest.raises(pydantic.ValidationError):
        parse_config({"method": "wanda", "nm": "2:4", "owl": {}})
    with pytest.raises(pydantic.ValidationError):
        parse_config({"method": "wanda", "sparsity": 0.5, "bogus": 1})
    with pytest.raises(RecipeError, match="wandda"):
        parse_config({"method": "wandda"})
    with pytest.raises(RecipeError, match="divisible by 5"):
        prune(tiny_model("llama"), {"method": "magnitude", "nm": "2:5"})
