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
def test_every_shipped_local_task_runs_on_real_rows(tok, monkeypatch):
    model = tiny()
    tasks = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada_openai", "cmmlu"]
    scored: list[dict] = []  # every request's log-likelihood, per evaluate() call (recorded, not replaced)
    original = HFLM.loglikelihood

    def recording(self, requests):
        answers = original(self, requests)
        scored[-1].update(zip(requests, (lp for lp, _ in answers)))
        return answers

    monkeypatch.setattr(HFLM, "loglikelihood", recording)
    scored.append({})
    out = evaluate(model, tok, tasks, limit=3, num_fewshot=1, data_dir=DATA, batch_size=16, progress=False)
    for name in tasks:
        res = out["results"][name]
        n = 3 * 67 if name == "cmmlu" else 3
        assert res["n"] == n, name
        assert res["stderr"] is not None and not math.isnan(res["stderr"])
        assert res["score"] == res["metrics"][res["metric"]], name
        if name != "cmmlu":  # the mean of three 0/1 scores, with the sample-std standard error
            k = round(res["score"] * 3)
            assert res["score"] == pytest.approx(k / 3) and 0 <= k <= 3, name
            assert res["stderr"] == pytest.approx(math.sqrt(k / 3 * (1 - k / 3) / 2)), name
        assert res["source"].startswith("local:")
    assert out["results"]["lambada_openai"]["metrics"]["perplexity"] > 1.0
    assert len(out["results"]["cmmlu"]["subjects"]) == 67
    assert out["config"]["num_fewshot"] == 1 and out["config"]["device"] == "cpu"
    # batching must not change any number: the same run, one request per forward pass, gives the
    # same log-likelihood for every request (padding, shared contexts and the one-token cache at work)
    scored.append({})
    one = evaluate(model, tok, tasks, limit=3, num_fewshot=1, data_dir=DATA, batch_size=1, progress=False)
    assert len(scored[0]) > 800 and scored[1].keys() == scored[0].keys()
    assert [scored[1][k] for k in scored[0]] == pytest.approx(list(scored[0].values()), rel=1e-4, abs=1e-4)
    for name in tasks:
        assert one["results"][name]["metrics"] == pytest.approx(out["results"][name]["metrics"], rel=1e-4), name
    # zero-shot ARC-Easy on the first rows of the file, scored by hand from the LM's log-likelihoods
    rows = [json.loads(line) for line in (DATA / "tasks" / "arc_easy.jsonl").read_text().splitlines()[:5]]
    lm = HFLM(model, tok, progress=False)
    acc, acc_norm = [], []
    for r in rows:
        lps = [lp for lp, _ in lm.loglikelihood([(f"{r['query']}\nAnswer:", " " + c) for c in r["choices"]])]
        acc.append(float(max(range(len(lps)), key=lambda i: (lps[i], -i)) == r["gold"]))
        normed = [lp / len(c) for lp, c in zip(lps, r["choices"])]
        acc_norm.append(float(max(range(len(lps)), key=lambda i: (normed[i], -i)) == r["gold"]))
    arc = evaluate(model, tok, ["arc_easy"], limit=5, data_dir=DATA, progress=False)["results"]["arc_easy"]
    assert arc["metrics"]["acc"] == pytest.approx(sum(acc) / 5)
    assert arc["score"] == arc["metrics"]["acc_norm"] == pytest.approx(sum(acc_norm) / 5)


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


def test_ceval_and_gsm8k_run_from_local_files_in_their_official_formats(tmp_path, tok, monkeypatch):
    """Neither has a local copy in the shared data (hub only there), so both run here on files in
    the official layouts: C-Eval's ceval-exam.zip CSVs, GSM8K's jsonl with "#### <number>" answers."""
    from qingzhou.eval.tasks import load_task

    subjects = load_task("ceval").subjects
    header = "id,question,A,B,C,D,answer,explanation\n"
    for split in ("val", "dev"):
        (tmp_path / "ceval" / split).mkdir(parents=True)
        for subject in subjects:
            rows = [f"{i},{subject} 问题 {i}?,甲,乙,丙,丁,{'ABCD'[i % 4]},解释\n" for i in range(2)]
            (tmp_path / "ceval" / split / f"{subject}_{split}.csv").write_text(header + "".join(rows), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Two plus two?", "answer": "2 + 2 = 4\n#### 4"},
        {"question": "How many grams in 1.5 kg?", "answer": "1.5 * 1000 = 1500\n#### 1,500"}]))
    seen: dict[str, list] = {"ll": [], "gen": []}
    original = HFLM.loglikelihood
    monkeypatch.setattr(HFLM, "loglikelihood", lambda self, reqs: seen["ll"].extend(reqs) or original(self, reqs))
    # the first answer is right (after the "#### " extraction and "," removal), the second wrong
    monkeypatch.setattr(HFLM, "generate_until", lambda self, reqs: (
        seen["gen"].extend(reqs), ["So 4.\n#### 4", "#### 1,501"][: len(reqs)])[1])
    out = evaluate(tiny(), tok, ["ceval", "gsm8k"], num_fewshot=1, data_dir=tmp_path, progress=False)
    ceval = out["results"]["ceval"]
    assert ceval["n"] == 2 * len(subjects) == 104 and len(ceval["subjects"]) == 52
    assert ceval["source"].startswith("local:")
    context, continuation = seen["ll"][0]
    assert continuation in (" A", " B", " C", " D") and {c for _, c in seen["ll"][:4]} == {" A", " B", " C", " D"}
    subject = next(s for s in subjects if f"{s} 问题" in context)
    assert context.startswith(f"以下是中国关于{subjects[subject]}的单项选择题，请选出其中的正确答案。\n\n")
    # one solved dev example (its letter after 答案：), then the question, ending in 答案：
    assert context.count("答案：") == 2 and context.endswith("\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：")
    assert f"{subject} 问题 0?\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案： A\n\n" in context
    gsm = out["results"]["gsm8k"]
    assert gsm["n"] == 2 and gsm["score"] == pytest.approx(0.5)
    prompt, kwargs = seen["gen"][0]
    assert prompt.endswith("Question: Two plus two?\nAnswer:") and "Question:" in kwargs["until"]
