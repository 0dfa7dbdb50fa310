"""A finetune stage's adapter folder reloads through load_model (peft on its recorded base)."""
from __future__ import annotations

import pytest
import torch
import yaml

from qingzhou.llm import load_model
from qingzhou.recipes.runner import run_recipe


def test_adapter_artifact_reloads_on_resume(tmp_path, tiny_llama_dir):
    text = tmp_path / "t.txt"
    text.write_text("Arbitration awards are enforced under the New York Convention. " * 12)
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({"name": "ft", "stages": [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu"},
        {"kind": "finetune", "method": "lora", "r": 4, "max_steps": 3, "batch_size": 2, "learning_rate": 5e-3,
         "data": {"source": "builtin:industry-qa", "max_length": 64}},
        {"kind": "eval", "perplexity": {"data": str(text), "seq_len": 32}},
    ]}, sort_keys=False))
    first = run_recipe(str(path), tmp_path / "run", progress=False)
    adapter = first.stages[1]["model_out"]["source"]
    again = run_recipe(str(path), tmp_path / "run", resume=True, overrides=["stages.2.perplexity.batch_size=2"], progress=False)
    assert [s["resumed"] for s in again.stages] == [True, True, False]
    assert again.stages[2]["metrics"]["perplexity"]["ppl"] == pytest.approx(first.stages[2]["metrics"]["perplexity"]["ppl"], rel=1e-5)
    base, _ = load_model(str(tiny_llama_dir), device="cpu")
    tuned, _ = load_model(adapter, device="cpu")
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits, atol=1e-6)  # the adapter is applied
