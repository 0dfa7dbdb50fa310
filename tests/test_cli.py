"""The CLI end to end through Typer's CliRunner, and its equivalence with the Python API."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from qingzhou.cli.main import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_env_json():
    r = invoke("env", "--device", "cpu", "--json")
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["device"] == "cpu" and "torch" in info["versions"]


def test_recipes_ls_show_cp(tmp_path):
    r = invoke("recipes", "ls", "--json")
    names = [row["name"] for row in json.loads(r.stdout)]
    assert "quickstart" in names
    shown = invoke("recipes", "show", "quickstart").stdout
    assert yaml.safe_load(shown)["name"] == "quickstart"
    dest = tmp_path / "mine.yaml"
    assert invoke("recipes", "cp", "quickstart", str(dest)).exit_code == 0
    assert dest.read_text() == shown
    again = invoke("recipes", "cp", "quickstart", str(dest))
    assert again.exit_code == 2 and "already exists" in again.stderr


def _one_paragraph(r) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.stderr


def test_user_errors_exit_2_with_one_paragraph(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - kind: load\n    modle: smollm2\n")
    msg = _one_paragraph(runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "o")]))
    assert "bad.yaml:4" in msg and "did you mean 'model'" in msg
    msg = _one_paragraph(runner.invoke(app, ["run", str(tmp_path / "missing.yaml")]))
    assert "recipe file not found" in msg
    dev = tmp_path / "dev.yaml"
    dev.write_text("name: x\nstages:\n  - kind: load\n    device: npu\n  - kind: eval\n")
    msg = _one_paragraph(runner.invoke(app, ["run", str(dev), "--out", str(tmp_path / "d")]))
    assert "device 'npu' was requested but is not available" in msg
    msg = _one_paragraph(runner.invoke(app, ["eval", "ppl", str(tmp_path / "none.txt")]))
    assert "text file not found" in msg


def test_debug_shows_the_traceback(tmp_path):
    r = runner.invoke(app, ["--debug", "run", str(tmp_path / "missing.yaml")])
    assert r.exit_code != 0 and r.exception is not None and type(r.exception).__name__ == "RecipeError"


def test_eval_ppl_cli_equals_python_api(tiny_llama_dir, tmp_path):
    from qingzhou.data.corpus import load_text
    from qingzhou.eval.perplexity import perplexity
    from qingzhou.llm import load_model

    text = tmp_path / "t.txt"
    text.write_text(load_text("builtin:corpus")[:2000])
    r = invoke("eval", "ppl", str(text), "--model", str(tiny_llama_dir), "--seq-len", "64", "--device", "cpu", "--json")
    cli = json.loads(r.stdout)
    model, tok = load_model(str(tiny_llama_dir), device="cpu")
    api = perplexity(model, tok, text.read_text(), seq_len=64, progress=False)
    assert cli["ppl"] == pytest.approx(api.ppl, rel=1e-6) and cli["tokens"] == api.tokens


def test_generate_cli_equals_python_api(tiny_llama_dir):
    from qingzhou.llm import generate, load_model

    r = invoke("generate", "Hello", "--model", str(tiny_llama_dir), "-n", "6", "--device", "cpu", "--json")
    cli = json.loads(r.stdout)
    model, tok = load_model(str(tiny_llama_dir), device="cpu")
    api = generate(model, tok, "Hello", max_new_tokens=6)
    assert cli["text"] == api.text and cli["chat"] is True and cli["new_tokens"] == api.new_tokens


def test_generate_streams_to_the_terminal(tiny_llama_dir):
    r = invoke("generate", "Hello", "--model", str(tiny_llama_dir), "-n", "5", "--device", "cpu", "--no-chat")
    assert r.exit_code == 0 and "tokens" in r.stderr


def test_run_cli_equals_python_api(tiny_llama_dir, tmp_path):
    from qingzhou.recipes.runner import run_recipe

    text = tmp_path / "t.txt"
    text.write_text("Contracts allocate risk between the parties to a transaction. " * 10)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "eq", "stages": [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu"},
        {"kind": "eval", "perplexity": {"data": str(text), "seq_len": 32}},
    ]}))
    r = invoke("run", str(recipe), "--out", str(tmp_path / "cli"), "--json", "-s", "stages.1.perplexity.seq_len=16")
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    api = run_recipe(str(recipe), tmp_path / "api", overrides=["stages.1.perplexity.seq_len=16"], progress=False)
    assert cli["status"] == api.status == "complete"
    assert cli["stages"][1]["metrics"]["perplexity"]["ppl"] == pytest.approx(api.stages[1]["metrics"]["perplexity"]["ppl"], rel=1e-6)
    assert cli["stages"][1]["metrics"]["perplexity"]["seq_len"] == 16
