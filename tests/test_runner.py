"""The recipe runner: run directory layout, run.json, resume, and crash safety."""
from __future__ import annotations

import json

import pytest
import yaml

from qingzhou.errors import RecipeError
from qingzhou.recipes import registry
from qingzhou.recipes.runner import run_recipe


def recipe_file(tmp_path, model_dir, text_file, extra: list | None = None) -> str:
    stages = [
        {"kind": "load", "model": str(model_dir), "device": "cpu"},
        {"kind": "eval", "name": "base", "perplexity": {"data": str(text_file), "seq_len": 32}},
        {"kind": "generate", "prompts": ["hi"], "max_new_tokens": 4},
        *(extra or []),
        {"kind": "report"},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "seed": 7, "stages": stages}, sort_keys=False))
    return str(path)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The grid operator balances supply and demand every second of the day. " * 8)
    return path


def test_run_writes_the_documented_layout(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    result = run_recipe(recipe_file(tmp_path, tiny_llama_dir, text_file), out, progress=False)
    assert result.status == "complete"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["01-load", "02-eval", "03-generate", "04-report", "report.json", "report.md", "resolved_recipe.yaml", "run.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["seed"] == 7
    assert run["config"]["stages"][1]["perplexity"]["seq_len"] == 32
    assert run["environment"]["device"] == "cpu" and run["environment"]["versions"]["transformers"]
    assert str(text_file) in run["data_hashes"]
    assert [s["kind"] for s in run["stages"]] == ["load", "eval", "generate", "report"]
    assert all(s["seconds"] >= 0 for s in run["stages"])
    assert run["metrics"]["base"]["perplexity"]["ppl"] > 1
    assert (out / "02-eval" / "metrics.json").exists() and (out / "03-generate" / "samples.json").exists()
    assert "| base |" in (out / "report.md").read_text()


def test_existing_run_needs_resume(tmp_path, tiny_llama_dir, text_file):
    path = recipe_file(tmp_path, tiny_llama_dir, text_file)
    run_recipe(path, tmp_path / "run", progress=False)
    with pytest.raises(RecipeError, match="already holds a run"):
        run_recipe(path, tmp_path / "run", progress=False)


def test_resume_skips_complete_stages_and_reruns_changed_ones(tmp_path, tiny_llama_dir, text_file):
    path = recipe_file(tmp_path, tiny_llama_dir, text_file)
    first = run_recipe(path, tmp_path / "run", progress=False)
    again = run_recipe(path, tmp_path / "run", resume=True, progress=False)
    assert [s["resumed"] for s in again.stages] == [True] * 4
    assert again.stages[1]["metrics"] == first.stages[1]["metrics"]
    changed = run_recipe(path, tmp_path / "run", resume=True, overrides=["stages.2.max_new_tokens=3"], progress=False)
    assert [s["resumed"] for s in changed.stages] == [True, True, False, False]


@pytest.fixture
def exploding_stage():
    """A stage that writes a partial artifact, then dies (crash or Ctrl-C)."""
    from typing import Literal

    class Boom(registry.StageConfig):
        kind: Literal["boom"] = "boom"
        error: str = "crash"

    def run_boom(cfg, ctx):
        (ctx.work_dir / "half-written.safetensors").write_bytes(b"partial")
        if cfg.error == "none":
            return registry.StageResult(metrics={"ok": True})
        raise KeyboardInterrupt if cfg.error == "interrupt" else RuntimeError("disk full")

    registry.STAGES.add("boom", run_boom, Boom)
    yield
    registry.STAGES.remove("boom")


@pytest.mark.parametrize("error,exc", [("interrupt", KeyboardInterrupt), ("crash", RuntimeError)])
def test_crash_leaves_nothing_resume_would_trust(tmp_path, tiny_llama_dir, text_file, exploding_stage, error, exc):
    path = recipe_file(tmp_path, tiny_llama_dir, text_file, extra=[{"kind": "boom", "error": error}])
    out = tmp_path / "run"
    with pytest.raises(exc):
        run_recipe(path, out, progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == ("interrupted" if error == "interrupt" else "failed")
    assert [s["kind"] for s in run["stages"]] == ["load", "eval", "generate"]
    assert not (out / "04-boom").exists()
    assert not list(out.glob(".*tmp"))
    fixed = run_recipe(path, out, resume=True, overrides=["stages.3.error=none"], progress=False)
    assert [s["resumed"] for s in fixed.stages] == [True, True, True, False, False]
    assert (out / "04-boom" / "half-written.safetensors").exists() and (out / "04-boom" / "stage.json").exists()
