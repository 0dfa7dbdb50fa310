"""`qingzhou finetune` / `qingzhou export merge` and the finetune/export recipe stages, on a tiny saved model."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qingzhou.cli.main import app
from qingzhou.finetune.testing import byte_tokenizer, tiny_model

runner = CliRunner()
ROWS = [{"instruction": f"Meter reading {i}?", "output": f"[ok] {i * 11} kWh"} for i in range(16)]


@pytest.fixture()
def tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return d, data


def test_cli_finetune_then_export_merge(tiny_dir, tmp_path):
    torch.set_num_threads(1)
    model_dir, data = tiny_dir
    res = runner.invoke(app, ["finetune", str(data), "--model", str(model_dir), "--out", str(tmp_path / "ft"),
                              "--max-steps", "4", "--lr", "1e-2", "--r", "4", "--set", "dropout=0.0", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout[res.stdout.index("{"):])
    assert result["method"] == "lora" and result["steps"] == 4
    adapter_cfg = json.loads((tmp_path / "ft" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["base_model_name_or_path"] == str(model_dir)

    res = runner.invoke(app, ["export", "merge", str(tmp_path / "ft" / "adapter"), str(tmp_path / "merged"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{"):])["merged"] is True
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_cli_bad_row_is_a_one_paragraph_error(tiny_dir, tmp_path):
    model_dir, _ = tiny_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"instruction": "x"}) + "\n", encoding="utf-8")
    res = runner.invoke(app, ["finetune", str(bad), "--model", str(model_dir), "--out", str(tmp_path / "o"), "--max-steps", "1"])
    assert res.exit_code == 2
    assert "row 2" in res.output and "'output'" in res.output


def test_recipe_finetune_and_export_stages(tiny_dir, tmp_path):
    from qingzhou.recipes.runner import run_recipe
    from qingzhou.recipes.schema import validate_recipe

    torch.set_num_threads(1)
    model_dir, data = tiny_dir
    recipe = validate_recipe({"name": "t", "seed": 0, "stages": [
        {"kind": "load", "model": str(model_dir), "device": "cpu"},
        {"kind": "finetune", "method": "lora", "r": 4, "max_steps": 4, "learning_rate": 1e-2, "progress": False,
         "data": {"source": str(data), "eval_fraction": 0.2, "cache": False}},
        {"kind": "export", "merge": True},
    ]})
    run = run_recipe(recipe, tmp_path / "run", progress=False)
    stage_dirs = sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir())
    ft_dir = next(tmp_path / "run" / n for n in stage_dirs if n.endswith("finetune"))
    ex_dir = next(tmp_path / "run" / n for n in stage_dirs if n.endswith("export"))
    assert (ft_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (ex_dir / "model" / "model.safetensors").is_file()
    assert run is not None


def test_recipe_rejects_unknown_method_field():
    from qingzhou.errors import RecipeError
    from qingzhou.recipes.schema import validate_recipe

    with pytest.raises(RecipeError, match="rank"):
        validate_recipe({"name": "t", "stages": [{"kind": "load"}, {"kind": "finetune", "method": "lora", "rank": 8}]})
