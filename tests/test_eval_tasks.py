"""Task files, prompts and metrics: the exact prompt text lm-eval would build, acc vs acc_norm,
standard errors by hand, hub field mappings (without network), clear errors on bad input."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from qingzhou.errors import DataError, RecipeError
from qingzhou.eval import metrics as M
from qingzhou.eval.harness import build_requests
from qingzhou.eval.tasks import list_tasks, load_task
from qingzhou.eval.tasks.data import DocGroup, canonical_docs, load_groups
from qingzhou.eval.tasks.kinds import KINDS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason="shared data not present")

REQUIRED = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada_openai",
            "cmmlu", "ceval"]


def test_every_required_task_ships_and_validates():
    names = list_tasks()
    assert set(REQUIRED) <= set(names)
    for name in names:
        spec = load_task(name)
        assert spec.task == name and spec.kind in KINDS


def test_unknown_task_suggests_the_closest():
    with pytest.raises(RecipeError, match="arc_easy"):
        load_task("arc_eazy")


def test_acc_and_acc_norm_choose_differently():
    # summed log-probs favour the short choice; per character the long one wins
    doc = {"choices": ["ab", "abcdefgh"], "gold": 1}
    answers = [(-4.0, False), (-6.0, False)]
    row = KINDS["multiple_choice"].obj.score(load_task("arc_easy"), doc, answers, None)
    assert row == {"acc": 0.0, "acc_norm": 1.0}  # -4 > -6, but -6/8 = -0.75 > -4/2 = -2
    doc["gold"] = 0
    assert KINDS["multiple_choice"].obj.score(load_task("arc_easy"), doc, answers, None) == {"acc": 1.0, "acc_norm": 0.0}


def test_stderr_and_perplexity_by_hand():
    assert M.mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)  # sample sd 0.5 / sqrt(4)
    assert M.mean_stderr([1.0]) is None
    assert M.perplexity([-1.0, -3.0]) == pytest.approx(math.e ** 2)
    assert M.weighted_perplexity([-6.0, -4.0], [3, 2]) == pytest.approx(math.e ** 2)
    assert M.bits_per_byte([-math.log(2) * 8], [4]) == pytest.approx(2.0)
    value, se = M.aggregate("acc", [{"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}, {"acc": 1.0}])
    assert (value, se) == (0.75, pytest.approx(0.25))


def test_answer_extraction_like_lm_eval_gsm8k():
    spec = load_task("gsm8k")
    a = spec.answer
    gen = " She has 3 + 4 = 7 apples.\n#### 1,007."
    pred = M.normalize_answer(M.extract_answer(gen, a.regex, a.group_select), a.ignore)
    gold = M.normalize_answer("Reasoning...\n#### 1007", a.ignore)
    assert pred == gold == "1007"
    assert M.extract_answer("no number here", a.regex) == "[invalid]"
    row = KINDS["generate_until"].obj.score(spec, {"target": "x\n#### 1007"}, [gen], None)
    assert row == {"exact_match": 1.0}


def _group(docs, fewshot=None):
    return DocGroup(None, docs, fewshot, "test")


def test_fewshot_prompt_is_exactly_lm_eval_layout():
    spec = load_task("arc_easy")
    docs = [{"query": f"Question: q{i}?", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(6)]
    scored, requests = build_requests(spec, _group(docs), num_fewshot=2, seed=3, limit=1)
    # no dev split locally: shots come from the same split, minus the scored row, one Random(seed)
    shots = [d for d in random.Random(3).sample(docs, 3) if d is not docs[0]][:2]
    prefix = "".join(f"{s['query']}\nAnswer: {s['choices'][s['gold']]}\n\n" for s in shots)
    assert requests[0] == [(prefix + "Question: q0?\nAnswer:", " a0"), (prefix + "Question: q0?\nAnswer:", " b0")]
    # zero-shot: just the question
    _, zero = build_requests(spec, _group(docs), num_fewshot=0, seed=3, limit=2)
    assert zero[1][0] == ("Question: q1?\nAnswer:", " a1")


def test_fewshot_never_includes_the_scored_row():
    spec = load_task("arc_easy")
    docs = [{"query": f"Question: q{i}?", "choices": ["x", "y"], "gold": 0} for i in range(4)]
    _, requests = build_requests(spec, _group(docs), num_fewshot=3, seed=0, limit=None)
    for i, reqs in enumerate(requests):
        context = reqs[0][0]
        assert context.count(f"q{i}?") == 1 and context.endswith(f"q{i}?\nAnswer:")
    with pytest.raises(DataError, match="4-shot"):
        build_requests(spec, _group(docs), num_fewshot=4, seed=0, limit=1)


@needs_data
def test_cmmlu_prompt_first_n_dev_shots_with_description():
    spec = load_task("cmmlu")
    spec = spec.model_copy(update={"subjects": {"agronomy": "农学"}})
    (group,) = load_groups(spec, DATA)
    assert len(group.fewshot) == 5
    _, requests = build_requests(spec, group, num_fewshot=2, seed=0, limit=1)
    d0, d1, t = group.fewshot[0], group.fewshot[1], group.docs[0]
    def q(d):
        return f"{d['Question'].strip()}\nA. {d['A']}\nB. {d['B']}\nC. {d['C']}\nD. {d['D']}\n答案："
    expected = ("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
                + q(d0) + " " + d0["Answer"] + "\n\n" + q(d1) + " " + d1["Answer"] + "\n\n" + q(t))
    assert d0["Question"] == "肉牛屠宰后，胴体的哪个部位肉质较好" and d0["Answer"] == "C"
    assert [r[0] for r in requests[0]] == [expected] * 4
    assert [r[1] for r in requests[0]] == [" A", " B", " C", " D"]
    assert t["gold"] == 1  # first agronomy test row answers B


@needs_data
def test_local_prompts_match_lm_eval_text():
    first = {name: load_groups(load_task(name), DATA)[0].docs[0] for name in
             ["piqa", "boolq", "winogrande", "lambada_openai", "hellaswag"]}
    (piqa,) = build_requests(load_task("piqa"), _group([first["piqa"]]), 0, 0, None)[1]
    assert piqa[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    (boolq,) = build_requests(load_task("boolq"), _group([first["boolq"]]), 0, 0, None)[1]
    assert boolq[0][0].startswith("All biomass goes through")
    assert boolq[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in boolq] == [" no", " yes"]
    (wino,) = build_requests(load_task("winogrande"), _group([first["winogrande"]]), 0, 0, None)[1]
    assert wino == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                    ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    (lamb,) = build_requests(load_task("lambada_openai"), _group([first["lambada_openai"]]), 0, 0, None)[1]
    assert lamb[0][0].endswith("I don't care about") and lamb[0][1] == " signs"
    (hs,) = build_requests(load_task("hellaswag"), _group([first["hellaswag"]]), 0, 0, None)[1]
    assert hs[0] == ("Roof shingle removal: A man is sitting on a roof. he", " is using wrap to wrap a pair of skis.")


def test_hub_field_mappings_give_the_local_canonical_rows():
    """The hub code path's row mapping, checked offline on rows shaped like the hub datasets."""
    arc = canonical_docs(load_task("arc_easy"), [{"question": "Which gas?", "answerKey": "C",
        "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}}], load_task("arc_easy").hub.fields, "hub")
    assert (arc[0]["query"], arc[0]["choices"], arc[0]["gold"]) == ("Question: Which gas?", ["a", "b", "c", "d"], 2)
    boolq = canonical_docs(load_task("boolq"), [{"passage": "P.", "question": "is it", "label": 1}],
                           load_task("boolq").hub.fields, "hub")
    assert boolq[0]["query"] == "P.\nQuestion: is it?" and boolq[0]["choices"] == ["no", "yes"]
    wino = canonical_docs(load_task("winogrande"), [{"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah",
                          "option2": "Maria", "answer": "2"}], load_task("winogrande").hub.fields, "hub")
    assert wino[0]["context_options"] == ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"]
    assert (wino[0]["continuation"], wino[0]["gold"]) == ("won.", 1)
    lamb = canonical_docs(load_task("lambada_openai"), [{"text": "a b c signs"}], load_task("lambada_openai").hub.fields, "hub")
    assert (lamb[0]["context"], lamb[0]["continuation"]) == ("a b c", "signs")
    hs = canonical_docs(load_task("hellaswag"), [{"activity_label": "Roof", "ctx_a": "A man [title] sits.",
                        "ctx_b": "he", "endings": ["is [step] up [title] now.", "b", "c", "d"], "label": "3"}],
                        load_task("hellaswag").hub.fields, "hub")
    assert hs[0]["query"] == "Roof: A man. sits. He" and hs[0]["choices"][0] == "is up. now." and hs[0]["gold"] == 3
    piqa = canonical_docs(load_task("piqa"), [{"goal": "g", "sol1": "x", "sol2": "y", "label": 0}],
                          load_task("piqa").hub.fields, "hub")
    assert (piqa[0]["query"], piqa[0]["choices"]) == ("Question: g", ["x", "y"])


def test_bad_rows_and_missing_data_name_where(tmp_path):
    spec = load_task("arc_easy")
    bad = tmp_path / "arc.jsonl"
    bad.write_text(json.dumps({"query": "Q", "choices": ["a", "b"], "gold": 0}) + "\n"
                   + json.dumps({"query": "Q", "choices": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(DataError, match=r"arc.jsonl, row 1.*gold 5"):
        load_groups(spec, path=bad)
    (bad := tmp_path / "broken.jsonl").write_text('{"query": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:1"):
        load_groups(spec, path=bad)
    with pytest.raises(DataError, match="no local data"):
        load_groups(spec, data_dir=tmp_path, source="local")
    with pytest.raises(DataError, match="does not exist"):
        load_groups(spec, data_dir=tmp_path / "nope")


@needs_data
def test_wikitext_is_62_detokenised_articles():
    spec = load_task("wikitext")
    (group,) = load_groups(spec, DATA)
    assert len(group.docs) == 62
    first = group.docs[0]
    assert first["original"].startswith(" = Robert Boulter = \n")
    assert first["text"].startswith(" = Robert Boulter =\n")  # " \n" -> "\n" by the detokeniser
    assert " @-@ " in "".join(d["original"] for d in group.docs) and " @-@ " not in "".join(d["text"] for d in group.docs)
    assert sum(len(d["original"]) for d in group.docs) == 1288556 - 2  # all but the opening " \n" line
