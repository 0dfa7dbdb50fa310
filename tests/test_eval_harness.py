"""`evaluate(...)` end to end on tiny random models: scores equal to a hand computation from the LM's
log-likelihoods, generation + exact match, corpus perplexity, and a smoke run on every shipped task's
real data with `limit`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from qingzhou.errors import RecipeError
from qingzhou.eval.harness import evaluate
from qingzhou.eval.lm import HFLM

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE trained in-process: encodes any text, Chinese included, without downloads."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(["Question: what is the answer?\nAnswer: the sea is deep and wide."] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")


def tiny(arch="llama"):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=384, max_position_embeddings=1024)
    model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    return model.eval()


def write_task(tmp_path: Path, spec: str, rows: list[dict]) -> Path:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "task.yaml"
    path.write_text(spec.replace("ROWS", str(tmp_path / "rows.jsonl")))
    return path


MC = """task: my_mc
kind: multiple_choice
doc_to_text: "Q: {{query}}\\nA:"
metrics: [acc, acc_norm]
headline: acc_norm
local: {path: ROWS}
"""


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_multiple_choice_scores_equal_hand_computation(tmp_path, tok, arch):
    rows = [{"query": f"what is {i}?", "choices": ["the sea", "deep and wide water", "it"], "gold": i % 3}
            for i in range(7)]
    model = tiny(arch)
    out = evaluate(model, tok, [str(write_task(tmp_path, MC, rows))], batch_size=4, progress=False)
    res = out["results"]["my_mc"]
    lm = HFLM(model, tok, progress=False)
    acc, acc_norm = [], []
    for r in rows:
        lps = [lp for lp, _ in lm.loglikelihood([(f"Q: {r['query']}\nA:", " " + c) for c in r["choices"]])]
        acc.append(float(max(range(3), key=lambda i: (lps[i], -i)) == r["gold"]))
        normed = [lp / len(c) for lp, c in zip(lps, r["choices"])]
        acc_norm.append(float(max(range(3), key=lambda i: (normed[i], -i)) == r["gold"]))
    assert res["metrics"]["acc"] == pytest.approx(sum(acc) / 7)
    assert res["score"] == res["metrics"]["acc_norm"] == pytest.approx(sum(acc_norm) / 7)
    p = sum(acc_norm) / 7
    assert res["stderr"] == pytest.approx(math.sqrt(p * (1 - p) * 7 / 6 / 7))
    assert res["n"] == 7 and res["seconds"] > 0 and res["metric"] == "acc_norm"
    # limit keeps the first rows
    limited = evaluate(model, tok, [str(tmp_path / "task.yaml")], limit=3, progress=False)["results"]["my_mc"]
    assert limited["n"] == 3 and limited["metrics"]["acc"] == pytest.approx(sum(acc[:3]) / 3)


def test_generation_task_exact_match(tmp_path, tok):
    model = tiny()
    model.generation_config.pad_token_id = tok.eos_token_id
    spec = """task: my_gen
kind: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
metrics: [exact_match]
headline: exact_match
generation: {until: ["\\n"], max_gen_toks: 6}
local: {path: ROWS}
"""
    lm = HFLM(model, tok, progress=False)
    prompts = ["Question: what is the answer?\nAnswer:", "Question: the sea?\nAnswer:"]
    outs = lm.generate_until([(p, {"until": ["\n"], "max_gen_toks": 6}) for p in prompts])
    rows = [{"question": "what is the answer?", "target": outs[0]}, {"question": "the sea?", "target": outs[1] + "x"}]
    res = evaluate(model, tok, [str(write_task(tmp_path, spec, rows))], progress=False)["results"]["my_gen"]
    assert res["score"] == pytest.approx(0.5)  # first reproduces the greedy output, second cannot


def test_corpus_perplexity_task(tmp_path, tok):
    model = tiny()
    spec = """task: my_corpus
kind: rolling
metrics: [word_perplexity, byte_perplexity, bits_per_byte, token_perplexity]
headline: word_perplexity
local: {path: ROWS}
"""
    texts = ["the sea is deep and wide. " * 30, "what is the answer?"]
    res = evaluate(model, tok, [str(write_task(tmp_path, spec, [{"text": t} for t in texts]))],
                   max_length=32, progress=False)["results"]["my_corpus"]
    ll = sum(HFLM(model, tok, max_length=32, progress=False).loglikelihood_rolling(texts))
    words = sum(len(t.split()) for t in texts) + 1  # lm-eval splits on \s+: a trailing space adds one
    n_bytes = sum(len(t.encode()) for t in texts)
    tokens = sum(len(tok.encode(t)) for t in texts)
    m = res["metrics"]
    assert m["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert m["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
    assert m["token_perplexity"] == pytest.approx(math.exp(-ll / tokens), rel=1e-5)
    with pytest.raises(RecipeError, match="zero-shot"):
        evaluate(model, tok, [str(tmp_path / "task.yaml")], num_fewshot=1, progress=False)


@pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="shared data not present")
def test_every_shipped_local_task_runs_on_real_rows(tok):
    model = tiny()
    tasks = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada_openai", "cmmlu"]
    out = evaluate(model, tok, tasks, limit=3, num_fewshot=1, data_dir=DATA, batch_size=16, progress=False)
    for name in tasks:
        res = out["results"][name]
        n = 3 * 67 if name == "cmmlu" else 3
        assert res["n"] == n, name
        assert 0.0 <= res["score"] <= 1.0 and res["stderr"] is not None and not math.isnan(res["stderr"])
        assert res["source"].startswith("local:")
    assert out["results"]["lambada_openai"]["metrics"]["perplexity"] > 1.0
    assert len(out["results"]["cmmlu"]["subjects"]) == 67
    assert out["config"]["num_fewshot"] == 1 and out["config"]["device"] == "cpu"


def test_unknown_task_fails_before_any_work(tok):
    with pytest.raises(RecipeError, match="Did you mean 'piqa'"):
        evaluate(tiny(), tok, ["piqa2"], progress=False)


@pytest.mark.skipif(not (DATA / "wikitext-2-raw").is_dir(), reason="shared data not present")
def test_wikitext_corpus_task_on_real_articles(tok):
    res = evaluate(tiny(), tok, ["wikitext"], limit=1, data_dir=DATA, max_length=256, progress=False)
    m = res["results"]["wikitext"]["metrics"]
    assert res["results"]["wikitext"]["n"] == 1
    # a random model is near-uniform over its 384 tokens: every unit costs more than one token would
    assert m["token_perplexity"] > 100 and m["word_perplexity"] > m["token_perplexity"] > m["byte_perplexity"] > 1
    assert m["bits_per_byte"] == pytest.approx(math.log2(m["byte_perplexity"]))
