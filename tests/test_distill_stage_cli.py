"""`kind: distill` recipe stages (teacher = the run's base model) and the `qingzhou distill` command."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

TEXT = "\n".join(f"Line {i}: the grid operator balances supply and demand, hour {i % 24}." for i in range(60))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return str(path)


def hand_kl(recipe, student_dir, teacher_dir) -> float:
    """Token-weighted forward KL(teacher || student), temperature 1, over the labelled next-token
    positions of the distill stage's held-out rows, one row at a time."""
    from transformers import AutoModelForCausalLM

    from qingzhou.data.prepare import prepare_data
    from qingzhou.llm import load_model
    from qingzhou.recipes.schema import load_recipe

    _, tok = load_model(str(teacher_dir), device="cpu")
    rows = prepare_data(load_recipe(recipe).stages[2].data, tok).eval
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    total, count = 0.0, 0
    for row in rows:
        ids, labels = torch.tensor([row.input_ids]), torch.tensor(row.labels)
        with torch.no_grad():
            log_s, log_t = student(ids).logits[0, :-1].log_softmax(-1), teacher(ids).logits[0, :-1].log_softmax(-1)
        keep = labels[1:] != -100
        total += float((log_t.exp() * (log_t - log_s)).sum(-1)[keep].sum())
        count += int(keep.sum())
    assert count > 0
    return total / count


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
    # KL(teacher || student) on the held-out rows, recomputed by hand: the pruned student before
    # distillation, the distilled one after. (On a random tiny teacher, four steps on its cached
    # top-32 logits plus 10% label loss need not lower the full-vocabulary KL, so no direction.)
    kl_before = hand_kl(recipe, tmp_path / "run" / "02-prune" / "model", tiny_llama_dir)
    kl_after = hand_kl(recipe, tmp_path / "run" / "03-distill" / "model", tiny_llama_dir)
    assert all(math.isfinite(kl) and kl > 1e-4 for kl in (kl_before, kl_after)) and abs(kl_after - kl_before) > 1e-3
    assert metrics["kl_before"] == pytest.approx(kl_before, abs=6e-5)  # reported rounded to 4 decimals
    assert metrics["kl_after"] == pytest.approx(kl_after, abs=6e-5)
    report = json.loads((tmp_path / "run" / "03-distill" / "distill.json").read_text())  # unrounded
    assert report["kl_before"] == pytest.approx(kl_before, rel=1e-5)
    assert report["kl_after"] == pytest.approx(kl_after, rel=1e-5)
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


def test_cli_distill_quant_scales_repairs_a_quantized_folder(tmp_path, tiny_dirs, text_file):
    from qingzhou.cli.main import app
    from qingzhou.llm import load_model
    from qingzhou.llm.quantized.qlinear import QuantLinear

    q = tmp_path / "q3"
    res = CliRunner().invoke(app, ["quantize", str(tiny_dirs["llama"]), str(q), "--method", "rtn", "--bits", "3",
                                   "--group-size", "32"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["distill", str(q), text_file, "--teacher", str(tiny_dirs["llama"]),
                                   "--out", str(tmp_path / "out"), "--method", "quant_scales", "--max-steps", "12",
                                   "--lr", "1e-2", "--top-k", "0", "--max-length", "64", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    # (the KL going down is test_quant_scales.py's, with a confident teacher; this random one is near uniform)
    assert data["finetune"]["method"] == "quant_scales" and data["finetune"]["steps"] == 12
    model, _ = load_model(str(tmp_path / "out" / "model"), device="cpu")  # a GPTQ folder again
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    before = json.loads((q / "config.json").read_text())["quantization_config"]
    after = json.loads((tmp_path / "out" / "model" / "config.json").read_text())["quantization_config"]
    assert (before["bits"], before["group_size"]) == (after["bits"], after["group_size"]) == (3, 32)
