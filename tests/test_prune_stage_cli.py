"""`kind: prune` recipe stages and the `qingzhou prune` command, on tiny saved models."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qingzhou.compress.prune.masks import is_nm

TEXT = "The grid operator balances supply and demand every second of the day. " * 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return str(path)


def test_recipe_prune_stages_save_loadable_models(tmp_path, tiny_llama_dir, calib_file):
    from transformers import AutoModelForCausalLM

    from qingzhou.recipes.runner import run_recipe

    calibration = {"source": calib_file, "seq_len": 32, "num_samples": 6}
    stages = [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"},
        {"kind": "prune", "method": "sparsegpt", "nm": "2:4", "calibration": calibration},
        {"kind": "prune", "method": "structured", "heads": 0.5, "mlp": 0.5, "calibration": calibration},
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "p", "seed": 0, "stages": stages}, sort_keys=False))
    result = run_recipe(str(recipe), tmp_path / "run", progress=False)
    assert result.status == "complete"
    sparse = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "02-prune" / "model")
    for name, m in sparse.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            assert is_nm(m.weight, 2, 4), name
    metrics = json.loads((tmp_path / "run" / "02-prune" / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.5)
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "03-prune" / "model")
    assert small.config.num_key_value_heads == 1 and small.config.intermediate_size == 64
    report = json.loads((tmp_path / "run" / "03-prune" / "prune_report.json").read_text())
    assert report["parameters_after"] == sum(p.numel() for p in small.parameters())


def test_bad_prune_stage_fails_validation(tmp_path, tiny_llama_dir):
    from qingzhou.errors import RecipeError
    from qingzhou.recipes.runner import run_recipe

    stages = [{"kind": "load", "model": str(tiny_llama_dir)}, {"kind": "prune", "method": "wanda", "nm": "2-4"}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "p", "stages": stages}))
    with pytest.raises(RecipeError, match="2:4"):
        run_recipe(str(recipe), tmp_path / "run", progress=False)


def test_cli_prune_json(tmp_path, tiny_llama_dir, calib_file):
    from qingzhou.cli.main import app

    res = CliRunner().invoke(app, ["prune", str(tiny_llama_dir), str(tmp_path / "out"), "--method", "wanda",
                                   "--sparsity", "0.6", "--calibration", calib_file, "--num-samples", "4",
                                   "--seq-len", "32", "--per-layer", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["sparsity"] == pytest.approx(int(64 * 0.6) / 64)  # = int(128 * 0.6) / 128: per-row exact
    assert len(data["layers"]) == 2
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    w = m.model.layers[0].mlp.down_proj.weight  # 128-wide input: 76 zeros per row
    assert ((w == 0).sum(dim=1) == int(128 * 0.6)).all()
