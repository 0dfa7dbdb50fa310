"""`qingzhou finetune` / `qingzhou export merge` and the finetune/export recipe stages, on a tiny saved model."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qingzhou.cli.main import app
from qingzhou.finetune.testing import byte_tokenizer, tiny_model
from qingzhou.llm import devices

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


@pytest.mark.skipif(not devices.capabilities("cpu").bitsandbytes, reason="needs bitsandbytes >= 0.46 (CPU backend)")
def test_cli_qlora_with_8bit_optimizer_on_cpu(tiny_dir, tmp_path):
    torch.set_num_threads(1)
    model_dir, data = tiny_dir
    res = runner.invoke(app, ["finetune", str(data), "--model", str(model_dir), "--out", str(tmp_path / "ft"), "--method", "qlora",
                              "--optimizer", "paged_adamw_8bit", "--max-steps", "3", "--lr", "1e-2", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout[res.stdout.index("{"):])
    assert result["method"] == "qlora" and result["eval_loss_after"] < result["eval_loss_before"]
    assert (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").is_file()
    res = runner.invoke(app, ["finetune", str(data), "--model", str(model_dir), "--out", str(tmp_path / "x"), "--optimizer", "adam8"])
    assert res.exit_code == 2 and "adam" in res.output


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
    assert run.status == "complete" and [s["kind"] for s in run.stages] == ["load", "finetune", "export"]
    assert run.metrics("finetune")[0]["steps"] == 4
    # the exported model is the base with the trained adapter merged in (peft's own merge), and the
    # adapter changed the model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 40, 41, 42, 60, 61, 62, 7]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        base_logits = base(ids).logits
        by_peft = PeftModel.from_pretrained(base, ft_dir / "adapter").merge_and_unload().eval()(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(ex_dir / "model").eval()(ids).logits
    torch.testing.assert_close(exported, by_peft, rtol=0, atol=1e-5)
    assert (exported - base_logits).abs().max() > 1e-3


def test_recipe_rejects_unknown_method_field():
    from qingzhou.errors import RecipeError
    from qingzhou.recipes.schema import validate_recipe

    with pytest.raises(RecipeError, match="rank"):
        validate_recipe({"name": "t", "stages": [{"kind": "load"}, {"kind": "finetune", "method": "lora", "rank": 8}]})


def test_finetune_stage_takes_flat_method_keys_like_quantize_and_prune(tmp_path):
    """MethodStage: flat keys are the method's settings, typos name the closest key, a resolved
    recipe reads back the same, and an unset seed follows the recipe's seed."""
    from qingzhou.errors import RecipeError
    from qingzhou.recipes.schema import load_recipe, validate_recipe
    from qingzhou.recipes.stages.finetune import FinetuneStage

    stage = FinetuneStage.model_validate({"kind": "finetune", "method": "qlora", "r": 8, "optimizer": "paged_adamw_8bit"})
    assert stage.settings.method == "qlora" and stage.settings.r == 8 and "seed" not in stage.method_settings()
    assert stage.method_config(seed=7).seed == 7 and stage.method_config(seed=7).optimizer == "paged_adamw_8bit"
    pinned = FinetuneStage.model_validate({"kind": "finetune", "seed": 3})
    assert pinned.method == "lora" and pinned.method_config(seed=7).seed == 3
    with pytest.raises(RecipeError, match="stages.1.alhpa.*did you mean 'alpha'"):
        validate_recipe({"name": "t", "stages": [{"kind": "load"}, {"kind": "finetune", "alhpa": 8}]})
    with pytest.raises(RecipeError, match="Did you mean 'dora'"):
        validate_recipe({"name": "t", "stages": [{"kind": "load"}, {"kind": "finetune", "method": "drora"}]})
    recipe = validate_recipe({"name": "t", "stages": [{"kind": "load"}, {"kind": "finetune", "method": "dora", "r": 4}]})
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe.to_yaml(), encoding="utf-8")
    again = load_recipe(str(path))
    assert again.stages[1].settings == recipe.stages[1].settings and "settings" not in recipe.to_dict()["stages"][1]
