"""`qingzhou eval tasks` and `qingzhou bench` through the real Typer app, on a tiny saved model."""
from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from qingzhou.cli.main import app

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(["<eos>", "Q:", "A:", "yes", "no", "sea", "sky", "is", "the", "what"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=16)).save_pretrained(folder)
    return folder


def test_eval_tasks_list_json():
    res = CliRunner().invoke(app, ["eval", "tasks", "--list", "--json"])
    assert res.exit_code == 0, res.output
    names = {row["task"] for row in json.loads(res.stdout)}
    assert {"arc_easy", "cmmlu", "ceval", "winogrande"} <= names


def test_eval_tasks_runs_a_task_file(tmp_path, model_dir):
    rows = [{"query": "what is the sea", "choices": ["sea", "the sky is"], "gold": i % 2} for i in range(4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text(
        "task: t\nkind: multiple_choice\ndoc_to_text: 'Q: {{query}} A:'\nmetrics: [acc, acc_norm]\n"
        f"headline: acc\nlocal: {{path: {tmp_path / 'rows.jsonl'}}}\n")
    out_file = tmp_path / "res.json"
    res = CliRunner().invoke(app, ["eval", "tasks", str(tmp_path / "t.yaml"), "-m", str(model_dir), "--device", "cpu",
                                   "--json", "--no-progress", "--out", str(out_file)])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)["results"]["t"]
    assert result["n"] == 4 and result["score"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert json.loads(out_file.read_text())["results"]["t"]["score"] == result["score"]


def test_eval_tasks_unknown_task_exits_2(model_dir):
    res = CliRunner().invoke(app, ["eval", "tasks", "arc_eazy", "-m", str(model_dir), "--no-progress"])
    assert res.exit_code == 2 and "arc_easy" in res.output


def test_bench_command_json(model_dir):
    res = CliRunner().invoke(app, ["bench", "-m", str(model_dir), "--device", "cpu", "-b", "1", "--prompt-tokens", "4",
                                   "--new-tokens", "3", "--repeats", "2", "--warmup", "0", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["results"][0]["decode_tokens_per_s"]["n"] == 2 and data["config"]["model"] == str(model_dir)
