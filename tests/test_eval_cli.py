"""`qingzhou eval tasks` and `qingzhou bench` through the real Typer app, on a tiny saved model."""
from __future__ import annotations

import json
import math

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


QUERIES = ["what is the sea", "what is the sky", "the sea is", "the sky is", "is the sea", "what is", "the sea",
           "sky is"]
CHOICES = [["sea", "the sky is"], ["yes", "no"], ["sky", "sea"], ["no", "yes", "sea"], ["the sea", "sky"],
           ["is", "what is"], ["yes", "sky is"], ["sea", "no"]]


def hand_logprob(model, context: str, continuation: str) -> float:
    """log P(continuation | context) from one plain forward pass (the word-level tokenizer maps each
    space-separated word to one id, so no tokenizer subtleties enter)."""
    vocab = ["<eos>", "Q:", "A:", "yes", "no", "sea", "sky", "is", "the", "what"]
    ctx, cont = [vocab.index(w) for w in context.split()], [vocab.index(w) for w in continuation.split()]
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits.log_softmax(-1)[0]
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_eval_tasks_runs_a_task_file(tmp_path, model_dir):
    """The CLI's score is the one computed by hand from the model's log-likelihoods: gold is the
    model's own choice in 5 of 8 rows, so acc must be exactly 5/8 (any scoring bug moves it)."""
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    rows, acc_norm = [], []
    for i, (query, choices) in enumerate(zip(QUERIES, CHOICES)):
        lps = [hand_logprob(model, f"Q: {query} A:", c) for c in choices]
        best = max(range(len(choices)), key=lambda j: lps[j])
        assert sorted(lps)[-1] - sorted(lps)[-2] > 1e-3  # no near-tie that rounding could flip
        gold = best if i < 5 else (best + 1) % len(choices)
        normed = [lp / len(c) for lp, c in zip(lps, choices)]
        acc_norm.append(float(max(range(len(choices)), key=lambda j: normed[j]) == gold))
        rows.append({"query": query, "choices": choices, "gold": gold})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text(
        "task: t\nkind: multiple_choice\ndoc_to_text: 'Q: {{query}} A:'\nmetrics: [acc, acc_norm]\n"
        f"headline: acc\nlocal: {{path: {tmp_path / 'rows.jsonl'}}}\n")
    out_file = tmp_path / "res.json"
    res = CliRunner().invoke(app, ["eval", "tasks", str(tmp_path / "t.yaml"), "-m", str(model_dir), "--device", "cpu",
                                   "--json", "--no-progress", "--out", str(out_file)])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)["results"]["t"]
    assert result["n"] == 8 and result["metric"] == "acc"
    assert result["score"] == result["metrics"]["acc"] == pytest.approx(5 / 8)
    assert result["metrics"]["acc_norm"] == pytest.approx(sum(acc_norm) / 8)
    assert result["stderr"] == pytest.approx(math.sqrt(5 / 8 * 3 / 8 / 7))  # sample std / sqrt(n)
    assert json.loads(out_file.read_text())["results"]["t"]["score"] == result["score"]
    # the Python API on the same model and file gives the same numbers
    from qingzhou.eval.harness import evaluate
    from qingzhou.llm import load_model

    m, tok = load_model(str(model_dir), device="cpu")
    api = evaluate(m, tok, [str(tmp_path / "t.yaml")], progress=False)["results"]["t"]
    assert api["metrics"] == pytest.approx(result["metrics"])


def test_eval_tasks_unknown_task_exits_2(model_dir):
    res = CliRunner().invoke(app, ["eval", "tasks", "arc_eazy", "-m", str(model_dir), "--no-progress"])
    assert res.exit_code == 2 and "arc_easy" in res.output


def test_bench_command_json(model_dir):
    res = CliRunner().invoke(app, ["bench", "-m", str(model_dir), "--device", "cpu", "-b", "1", "--prompt-tokens", "4",
                                   "--new-tokens", "3", "--repeats", "2", "--warmup", "0", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["results"][0]["decode_tokens_per_s"]["n"] == 2 and data["config"]["model"] == str(model_dir)
