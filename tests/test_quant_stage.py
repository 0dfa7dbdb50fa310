"""The quantize stage inside a recipe: its artifact reloads (through load_model) on resume."""
from __future__ import annotations

import pytest
import yaml

from qingzhou.errors import RecipeError
from qingzhou.recipes.runner import run_recipe
from qingzhou.recipes.schema import load_recipe


def _recipe(tmp_path, model_dir, method: dict) -> str:
    text = tmp_path / "t.txt"
    text.write_text("Banks hold capital against credit, market and operational risk. " * 12)
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({"name": "q", "stages": [
        {"kind": "load", "model": str(model_dir), "device": "cpu"},
        {"kind": "quantize", **method},
        {"kind": "eval", "perplexity": {"data": str(text), "seq_len": 32}},
    ]}, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("method", [
    {"method": "rtn", "bits": 4, "group_size": 32},
    {"method": "gptq", "bits": 4, "group_size": 32, "calibration": {"num_samples": 4, "seq_len": 32}},
])
def test_quantized_artifact_reloads_on_resume(tmp_path, tiny_llama_dir, method):
    path = _recipe(tmp_path, tiny_llama_dir, method)
    first = run_recipe(path, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "02-quantize" / "model" / "config.json").exists()
    ppl = first.stages[2]["metrics"]["perplexity"]["ppl"]
    # Change only the eval stage: the quantized model must now come back from disk.
    again = run_recipe(path, tmp_path / "run", resume=True, overrides=["stages.2.perplexity.batch_size=2"], progress=False)
    assert [s["resumed"] for s in again.stages] == [True, True, False]
    assert again.stages[2]["metrics"]["perplexity"]["ppl"] == pytest.approx(ppl, rel=1e-5)


def test_quantize_stage_typo_is_reported(tmp_path, tiny_llama_dir):
    path = _recipe(tmp_path, tiny_llama_dir, {"method": "gptq", "bits": 4, "grop_size": 32})
    with pytest.raises(RecipeError, match=r"q.yaml:\d+: stages.1.grop_size.*did you mean 'group_size'"):
        load_recipe(path)
