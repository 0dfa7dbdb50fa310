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
    from qingzhou.eval.harness import evaluate
    from qingzhou.finetune.testing import byte_tokenizer, tiny_model

    out = evaluate(tiny_model("llama"), byte_tokenizer(), ["corpus_cloze"], limit=12, progress=False)
    r = out["results"]["corpus_cloze"]
    assert r["n"] == 12 and r["metric"] == "acc" and 0 <= r["score"] <= 1
    assert set(r["metrics"]) >= {"acc", "acc_norm", "acc_stderr"}
