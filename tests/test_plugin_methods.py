"""A new quantizer or pruner is one file plus one decorator line.

This module is that file: it registers a toy quantizer (plain round-to-nearest without clip
search) and a toy pruner (zero every odd input column) and reaches both from the
Python API, a recipe and the CLI without touching any other file of the package.
"""
from __future__ import annotations

import json
from typing import Any, Literal

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qingzhou.cli.main import app
from qingzhou.compress.prune.config import PruneConfig
from qingzhou.compress.prune.registry import PRUNERS, register_pruner
from qingzhou.compress.quantize.config import QuantizeConfig
from qingzhou.compress.quantize.registry import QUANTIZERS, register_quantizer
from qingzhou.finetune.testing import tiny_model
from qingzhou.recipes.runner import run_recipe


class HalfGridConfig(QuantizeConfig):
    """RTN without clip search on a grid of `bits`, the data-free way."""

    method: Literal["toy_rtn"] = "toy_rtn"
    clip_search: bool = False


@register_quantizer("toy_rtn", HalfGridConfig, needs_calibration=False)
def run_toy_rtn(model: Any, cfg: HalfGridConfig, plan: dict[str, Any], calib: Any) -> dict[str, Any]:
    from qingzhou.llm.quantized.grid import rtn_quantize_weight

    modules = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for name, scheme in plan.items():
            qw = rtn_quantize_weight(modules[name].weight, scheme)
            modules[name].weight.copy_(qw.dequantize().to(modules[name].weight.dtype))
            out[name] = {"quantized": qw}
    return {"modules": out}


class OddColumnsConfig(PruneConfig):
    method: Literal["toy_odd"] = "toy_odd"


@register_pruner("toy_odd", OddColumnsConfig, needs_calibration=False)
def run_toy_odd(model: Any, cfg: OddColumnsConfig, plan: dict[str, Any], calib: Any) -> dict[str, Any]:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in plan:
            modules[name].weight[:, 1::2] = 0
    return {"modules": {name: {} for name in plan}}


@pytest.fixture(autouse=True, scope="module")
def _unregister():
    yield
    QUANTIZERS.remove("toy_rtn")
    PRUNERS.remove("toy_odd")


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _odd_columns_zero(weights: dict[str, torch.Tensor]) -> None:
    assert weights
    for name, w in weights.items():
        assert (w[:, 1::2] == 0).all(), name
        assert (w[:, 0::2] != 0).float().mean() > 0.99, name  # the even columns are untouched


def test_api_reaches_the_new_methods():
    from qingzhou.compress.prune import prune
    from qingzhou.compress.quantize import quantize
    from qingzhou.llm.quantized.grid import QuantScheme, rtn_quantize_weight

    model = tiny_model("llama")
    dense = _linear_weights(model)
    report = quantize(model, {"method": "toy_rtn", "bits": 4, "group_size": 16, "pack": False})
    assert report.method == "toy_rtn" and len(report.modules) == len(dense)
    for name, w in _linear_weights(model).items():  # exactly plain RTN without clip search
        ref = rtn_quantize_weight(dense[name], QuantScheme(bits=4, group_size=16, sym=False, clip_search=False))
        torch.testing.assert_close(w, ref.dequantize().to(w.dtype), rtol=0, atol=0)
    model = tiny_model("llama")
    pr = prune(model, {"method": "toy_odd"})
    assert pr.method == "toy_odd" and pr.sparsity == pytest.approx(0.5)
    _odd_columns_zero(_linear_weights(model))


def test_recipe_reaches_the_new_methods(tmp_path, tiny_llama_dir):
    recipe = {"name": "plugin", "stages": [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu"},
        {"kind": "prune", "method": "toy_odd"},
        {"kind": "quantize", "method": "toy_rtn", "bits": 8, "group_size": 16},
    ]}
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = run_recipe(str(path), tmp_path / "run", progress=False)
    assert [s["kind"] for s in result.stages] == ["load", "prune", "quantize"]
    metrics = json.loads((tmp_path / "run" / "02-prune" / "metrics.json").read_text())
    assert metrics["method"] == "toy_odd" and metrics["sparsity"] == pytest.approx(0.5)
    qc = json.loads((tmp_path / "run" / "03-quantize" / "model" / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["method"] == "toy_rtn" and qc["bits"] == 8


def test_cli_reaches_the_new_methods(tmp_path, tiny_llama_dir):
    from qingzhou.llm import load_model

    runner = CliRunner()
    res = runner.invoke(app, ["prune", str(tiny_llama_dir), str(tmp_path / "p"), "--method", "toy_odd", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sparsity"] == pytest.approx(0.5)
    pruned, _ = load_model(str(tmp_path / "p"), dtype="float32", device="cpu")
    _odd_columns_zero(_linear_weights(pruned))
    res = runner.invoke(app, ["quantize", str(tmp_path / "p"), str(tmp_path / "q"), "--method", "toy_rtn",
                              "--bits", "4", "--group-size", "16", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["method"] == "toy_rtn"
    assert json.loads((tmp_path / "q" / "metrics.json").read_text())["quantized_linears"] > 0
    bad = runner.invoke(app, ["quantize", str(tmp_path / "p"), str(tmp_path / "r"), "--method", "toy_rtm"])
    assert bad.exit_code == 2 and "toy_rtn" in bad.output  # the closest registered name is suggested
