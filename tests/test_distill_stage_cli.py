"""`kind: distill` recipe stages (teacher = the run's base model) and the `qingzhou distill` command."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

TEXT = "\n".join(f"Line {i}: the grid operator balances supply and demand, hour {i % 24}." for i in range(60))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return str(path)


def test_recipe_prune_then_distill_from_the_base_model(tmp_path, tiny_llama_dir, text_file):
    from transformers import AutoModelForCausalLM

    from qingzhou.recipes.runner import run_recipe

    stages = [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"},
        {"kind": "prune", "method": "structured", "heads": 0.5, "mlp": 0.5,
         "calibration": {"source": text_file, "seq_len": 32, "num_samples": 6}},
        {"kind": "distill", "name": "kd", "teacher": "base", "data": {"source": text_file, "format": "text",
                                                                     "max_length": 64, "cache": False},
         "method": "full", "learning_rate": 1e-3, "max_steps": 4, "batch_size": 4, "temperature": 1.0,
         "kd_ratio": 0.9, "top_k": 32, "cache_dir": str(tmp_path / "tcache"), "progress": False},
        {"kind": "eval", "perplexity": {"data": text_file, "seq_len": 32, "max_windows": 2}},
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "d", "seed": 0, "stages": stages}, sort_keys=False))
    result = run_recipe(str(recipe), tmp_path / "run", progress=False)
    assert result.status == "complete"
    metrics = json.loads((tmp_path / "run" / "run.json").read_text())["metrics"]["kd"]
    assert metrics["teacher"] == "cache" and metrics["steps"] == 4 and metrics["teacher_source"] == str(tiny_llama_dir)
    assert metrics["kl_before"] is not None and metrics["kl_after"] is not None
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "03-distill" / "model")
    assert student.config.num_key_value_heads == 1 and student.config.intermediate_size == 64
    assert (tmp_path / "run" / "03-distill" / "distill.json").is_file()
    # the resolved recipe reads back to the same stage (flat keys, nested train settings)
    from qingzhou.recipes.schema import load_recipe

    again = load_recipe(tmp_path / "run" / "resolved_recipe.yaml")
    assert again.stages[2].settings == load_recipe(recipe).stages[2].settings


def test_distill_stage_validation_names_the_key(tmp_path, tiny_llama_dir):
    from qingzhou.errors import RecipeError
    from qingzhou.recipes.schema import load_recipe

    stages = [{"kind": "load", "model": str(tiny_llama_dir)},
              {"kind": "distill", "teacher": "base", "temprature": 2.0}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "d", "stages": stages}, sort_keys=False))
    with pytest.raises(RecipeError, match="temprature"):
        load_recipe(recipe)
    stages[1] = {"kind": "distill", "divergence": "kl"}
    recipe.write_text(yaml.safe_dump({"name": "d", "stages": stages}, sort_keys=False))
    with pytest.raises(RecipeError, match="divergence"):
        load_recipe(recipe)


def test_cli_distill_json(tmp_path, tiny_dirs, text_file):
    from qingzhou.cli.main import app

    res = CliRunner().invoke(app, ["distill", str(tiny_dirs["qwen2"]), text_file, "--teacher", str(tiny_dirs["llama"]),
                                   "--out", str(tmp_path / "out"), "--max-steps", "3", "--lr", "1e-3",
                                   "--top-k", "16", "--cache-dir", str(tmp_path / "tc"), "--max-length", "64",
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["finetune"]["steps"] == 3 and data["teacher"]["mode"] == "cache" and data["teacher"]["k"] == 16
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
