"""The quickstart's task: a multiple-choice cloze generated from the built-in corpus, shipped in the
package (so it needs no data folder) and exactly reproducible from its generator."""
from __future__ import annotations

import json
import re

import pytest

from qingzhou.data.corpus import load_text
from qingzhou.eval.tasks import load_task
from qingzhou.eval.tasks.cloze import CORPUS_CLOZE, cloze_items, sentences
from qingzhou.eval.tasks.data import load_groups


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_file_is_the_generators_output():
    shipped = [json.loads(line) for line in CORPUS_CLOZE.read_text(encoding="utf-8").splitlines()]
    assert shipped == cloze_items(load_text("builtin:corpus"))
    assert 250 <= len(shipped) <= 400


def test_items_are_true_cloze_questions():
    text = load_text("builtin:corpus")
    sents = sentences(text)
    vocab = set(re.findall(r"[a-z]+", text))
    for row in cloze_items(text):
        answer = row["choices"][row["gold"]]
        assert sents[row["sentence"]].startswith(row["query"] + " " + answer)  # the gold word comes next
        assert len(set(row["choices"])) == 4 and all(c in vocab for c in row["choices"])
        assert len(row["query"].split()) >= 3


def test_generation_is_seeded():
    text = load_text("builtin:corpus")
    assert cloze_items(text, seed=1) == cloze_items(text, seed=1) != cloze_items(text, seed=0)
    golds = [r["gold"] for r in cloze_items(text)]
    assert {g: golds.count(g) for g in range(4)}.keys() == {0, 1, 2, 3}  # the answer position is shuffled


def test_task_reads_package_data_whatever_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QINGZHOU_DATA_DIR", str(tmp_path))
    (group,) = load_groups(load_task("corpus_cloze"), data_dir=tmp_path)
    assert len(group.docs) == len(cloze_items(load_text("builtin:corpus")))
    assert group.docs[0]["choices"][group.docs[0]["gold"]] == "commodity"


def test_evaluate_scores_it_on_a_tiny_model():
    """acc and acc_norm of the first 12 items equal a hand computation from plain forward passes
    (the byte tokenizer encodes context + continuation as the two byte strings back to back)."""
    import torch

    from qingzhou.eval.harness import evaluate
    from qingzhou.finetune.testing import byte_tokenizer, tiny_model

    model, tok = tiny_model("llama"), byte_tokenizer()
    out = evaluate(model, tok, ["corpus_cloze"], limit=12, progress=False)
    r = out["results"]["corpus_cloze"]
    acc, acc_norm = [], []
    for row in cloze_items(load_text("builtin:corpus"))[:12]:
        ctx = tok(row["query"], add_special_tokens=False).input_ids
        lps = []
        for choice in row["choices"]:
            cont = tok(" " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([ctx + cont])).logits.log_softmax(-1)[0]
            lps.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        ranked = sorted(lps)
        assert ranked[-1] - ranked[-2] > 1e-4  # no near-tie that float rounding could flip
        acc.append(float(max(range(4), key=lambda i: lps[i]) == row["gold"]))
        normed = [lp / len(c) for lp, c in zip(lps, row["choices"])]
        acc_norm.append(float(max(range(4), key=lambda i: normed[i]) == row["gold"]))
    assert r["n"] == 12 and r["metric"] == "acc"
    assert r["score"] == r["metrics"]["acc"] == pytest.approx(sum(acc) / 12)
    assert r["metrics"]["acc_norm"] == pytest.approx(sum(acc_norm) / 12)
    assert set(r["metrics"]) >= {"acc", "acc_norm", "acc_stderr"}
