"""Data loading, format conversion, bad-row errors and assistant-only label masks."""
from __future__ import annotations

import csv
import json
import warnings

import pytest

from qingzhou.data import DataConfig, load_records, prepare_data, to_messages
from qingzhou.data.formats import detect_format
from qingzhou.data.templates import IGNORE_INDEX, TEMPLATES, encode_conversation, resolve_template
from qingzhou.errors import DataError
from qingzhou.finetune.testing import byte_tokenizer

ROWS = [
    {"instruction": "Define APR.", "input": "", "output": "Annual rate."},
    {"instruction": "Translate", "input": "电力", "output": "electric power"},
    {"instruction": "What is NPV?", "input": "", "output": "Net present value."},
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _write_all(tmp_path):
    paths = {}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    paths["csv"] = tmp_path / "d.csv"
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ROWS)
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
    return paths


def test_every_local_file_type_gives_the_same_rows(tmp_path):
    for kind, path in _write_all(tmp_path).items():
        recs = load_records(path)
        assert [r.data for r in recs] == ROWS, kind
        assert [r.row for r in recs] == [1, 2, 3]


def test_text_file_is_one_document_per_non_empty_line(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    recs = load_records(p)
    assert [r.data["text"] for r in recs] == ["first doc", "second doc"]
    assert [r.row for r in recs] == [1, 3]
    assert detect_format(recs[0].data) == "text"


def test_builtin_industry_set_is_valid_and_tagged(tok):
    recs = load_records("builtin:industry-qa")
    assert 40 <= len(recs) <= 80
    msgs = [to_messages(r, detect_format(r.data)) for r in recs]
    assert all(m[-1]["content"].startswith("【要点】") for m in msgs)
    assert sum(any("\u4e00" <= ch <= "\u9fff" for ch in m[-1]["content"]) for m in msgs) >= 10  # some Chinese


def test_missing_file_and_unknown_builtin_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="industry-qa"):
        load_records("builtin:industry-q")


def test_hub_name_goes_through_datasets_and_fails_clearly_offline(monkeypatch):
    import datasets

    calls = []

    def fake_load(repo, config=None, split=None):
        calls.append((repo, config, split))
        return [{"text": "hello"}, {"text": "world"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    recs = load_records("someone/corpus:en", split="validation")
    assert calls == [("someone/corpus", "en", "validation")]
    assert [r.data["text"] for r in recs] == ["hello", "world"]

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="hub:someone/corpus"):
        load_records("someone/corpus")


def test_bad_row_names_file_row_and_field(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    rows = [ROWS[0], ROWS[2], {"instruction": "no answer here"}, ROWS[1]]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = DataConfig(source=str(p), cache=False, eval_fraction=0)
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tok)
    text = str(err.value)
    assert str(p) in text and "row 3" in text and "'output'" in text

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = prepare_data(cfg.model_copy(update={"skip_bad_rows": True}), tok)
    assert data.stats["bad_rows"] == 1 and data.stats["train_samples"] == 3
    assert any("skipped 1 bad row" in str(w.message) for w in caught)


def test_sharegpt_bad_speaker_and_no_assistant(tok):
    from qingzhou.data.sources import Record

    bad = Record({"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]}, "f.json", 7)
    with pytest.raises(DataError, match=r"f.json, row 7.*conversations\[1\].from"):
        to_messages(bad, "sharegpt")
    none = Record({"messages": [{"role": "user", "content": "x"}]}, "f.json", 2)
    with pytest.raises(DataError, match="no assistant turn"):
        to_messages(none, "messages")


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Rate?"},
    {"role": "assistant", "content": "5%."},
    {"role": "user", "content": "And tax?"},
    {"role": "assistant", "content": "20%."},
]


def _hand_encoded(tok, pieces):
    """Concatenate pieces (text, learn?) with a byte tokenizer, where tokens never merge across pieces."""
    ids, labels = [], []
    for text, learn in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if learn else [IGNORE_INDEX] * len(t)
    return ids, labels


def test_multi_turn_mask_matches_hand_computed(tok):
    ids, labels = encode_conversation(tok, CONV, resolve_template(tok))
    exp_ids, exp_labels = _hand_encoded(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nRate?<|im_end|>\n<|im_start|>assistant\n", False),
        ("5%.<|im_end|>\n", True),
        ("<|im_start|>user\nAnd tax?<|im_end|>\n<|im_start|>assistant\n", False),
        ("20%.<|im_end|>\n", True),
    ])
    assert ids == exp_ids
    assert labels == exp_labels


def test_all_three_chat_formats_encode_identically(tok):
    from qingzhou.data.sources import Record

    alpaca = {"system": "Be brief.", "instruction": "And tax?", "output": "20%.", "history": [["Rate?", "5%."]]}
    sharegpt = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Rate?"}, {"from": "gpt", "value": "5%."},
        {"from": "human", "value": "And tax?"}, {"from": "gpt", "value": "20%."}]}
    messages = {"messages": CONV}
    template = resolve_template(tok)
    out = [encode_conversation(tok, to_messages(Record(r, "x", 1), detect_format(r)), template) for r in (alpaca, sharegpt, messages)]
    assert out[0] == out[1] == out[2]


def test_eos_appended_when_template_has_none_and_fallback_template(tok):
    no_eos = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    ids, labels = encode_conversation(tok, CONV[1:3], no_eos)
    exp_ids, exp_labels = _hand_encoded(tok, [("user: Rate?\nassistant: ", False), ("5%.\n", True)])
    assert ids == exp_ids + [tok.eos_token_id]
    assert labels == exp_labels + [tok.eos_token_id]

    bare = byte_tokenizer(chat_template=None)
    assert resolve_template(bare) == TEMPLATES["plain"]
    ids, labels = encode_conversation(bare, CONV[1:3], resolve_template(bare))
    assert ids.count(bare.eos_token_id) == 1 and labels[-3:] == ids[-3:]  # EOS + "\n\n" learned, not doubled


def test_train_on_prompt_and_truncation(tok):
    template = resolve_template(tok)
    ids, labels = encode_conversation(tok, CONV, template, train_on_prompt=True)
    assert labels == ids
    short, short_labels = encode_conversation(tok, CONV, template, max_length=20)
    assert len(short) == 20 and short == ids[:20]


def test_eval_split_is_held_out_and_deterministic(tok):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    cfg = DataConfig(source="<records>", eval_fraction=0.1, cache=False, seed=3)
    a = prepare_data(cfg, tok, records=rows)
    b = prepare_data(cfg, tok, records=rows)
    assert len(a.eval) == 4 and len(a.train) == 36
    assert [e.input_ids for e in a.eval] == [e.input_ids for e in b.eval]
    train_ids = {tuple(e.input_ids) for e in a.train}
    assert not any(tuple(e.input_ids) in train_ids for e in a.eval)
