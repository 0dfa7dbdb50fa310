"""From raw text to a pretrained model: cleaning, de-dup, tokenizer, token shards, pretraining, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qingzhou.data.dedup import clean_text, exact_duplicates, near_duplicates
from qingzhou.data.preprocess import preprocess
from qingzhou.data.token_shards import PackedWindows, read_index, restart_positions
from qingzhou.errors import DataError, ModelLoadError
from qingzhou.finetune.pretrain import perplexities, pretrain

WORDS = ("river market grid power price contract winter summer demand supply storage battery line "
         "factory engineer weather forecast reserve frequency turbine solar wind coal hydro nuclear").split()


def _doc(seed: int, n: int = 120) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n)) + "."


def test_clean_and_exact_duplicates():
    assert clean_text("a\x00b  c\u00a0d\r\n\n\n\ne\t f") == "ab c d\n\ne f"
    docs = ["The grid.", "the   GRID.", "Another one."]
    assert exact_duplicates(docs) == [False, True, False]


def test_near_duplicates_catch_small_edits_only():
    base = _doc(1, 400)
    words = base.split()
    edited = " ".join(words[:200] + ["unusual"] + words[201:])  # one word of 400 changed
    other = _doc(2, 400)
    flags = near_duplicates([base, other, edited], threshold=0.8)
    assert flags == [False, False, True]
    # below the threshold: a document with half its words replaced stays
    half = " ".join(words[:200] + _doc(3, 200).split())
    assert near_duplicates([base, half], threshold=0.8) == [False, False]


def test_restart_positions():
    assert restart_positions([5, 6, 0, 7, 8, 0, 9], eos_id=0) == [0, 1, 2, 0, 1, 2, 0]


def _corpus(tmp_path):
    docs = [_doc(i) for i in range(30)]
    lines = docs + [docs[3].upper(), "too short", docs[5].replace("river", "lake", 1)]
    path = tmp_path / "raw.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, docs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp")
    path, docs = _corpus(tmp)
    report = preprocess(str(path), tmp / "data", {"vocab_size": 400, "min_chars": 50, "val_fraction": 0.1},
                        progress=False)
    return tmp / "data", report, docs


def test_preprocess_counts_and_shards(shards):
    data, report, docs = shards
    assert report.documents == 33 and report.dropped_short == 1
    assert report.exact_duplicates == 1 and report.near_duplicates == 1
    assert report.train_documents + report.val_documents == 30 and report.val_documents >= 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    assert len(tok) == report.vocab_size <= 400
    assert tok.decode(tok(docs[0], add_special_tokens=False)["input_ids"]) == docs[0]  # byte-level: lossless
    index = read_index(data)
    assert index["dtype"] == "uint16"
    train = np.fromfile(data / index["splits"]["train"][0]["file"], dtype="<u2")
    assert train.size == report.train_tokens
    # the shard is the kept training documents, each encoded then followed by end-of-text
    text = tok.decode([t for t in train.tolist()], skip_special_tokens=False)
    pieces = [p for p in text.split(tok.eos_token) if p]
    assert len(pieces) == report.train_documents and set(pieces) <= set(docs)


def test_windows_are_lazy_slices_of_the_shards(shards):
    data, report, _ = shards
    w = PackedWindows(data, "train", 64)
    assert len(w) == report.train_tokens // 64
    flat = np.fromfile(data / read_index(data)["splits"]["train"][0]["file"], dtype="<u2")
    assert w[3].input_ids == flat[192:256].tolist()
    assert w.fingerprint == PackedWindows(data, "train", 64).fingerprint != PackedWindows(data, "train", 32).fingerprint


def test_missing_shard_is_a_clear_error(shards, tmp_path):
    import shutil

    data, _, _ = shards
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (copy / read_index(copy)["splits"]["train"][0]["file"]).unlink()
    with pytest.raises(DataError, match="missing"):
        PackedWindows(copy, "train", 64)


ARCH = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def test_architecture_errors(shards, tmp_path):
    data, _, _ = shards
    cfg = {"max_steps": 1, "progress": False}
    with pytest.raises(ModelLoadError, match="model_type"):
        pretrain(data, {"model_type": "llamma"}, cfg, seq_len=32, output_dir=tmp_path / "a")
    with pytest.raises(ModelLoadError, match="hidden_sise"):
        pretrain(data, {**ARCH, "hidden_sise": 8}, cfg, seq_len=32, output_dir=tmp_path / "b")


class Crash(Exception):
    pass


def test_pretrain_learns_and_resumes_exactly(shards, tmp_path):
    torch.set_num_threads(1)
    data, _, _ = shards
    cfg = {"max_steps": 24, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 6, "save_every": 6, "progress": False,
           "seed": 3, "save_every_minutes": 0}
    full = pretrain(data, ARCH, cfg, seq_len=32, output_dir=tmp_path / "straight")
    ppl = [p for _, p in perplexities(full)]
    assert len(ppl) == 5  # before, at 6, 12, 18 and after 24 steps
    assert all(b < a for a, b in zip(ppl, ppl[1:])), ppl  # falls at every evaluation
    assert ppl[-1] < 0.5 * ppl[0]

    def crash(step, metrics):
        if step == 15:
            raise Crash()

    with pytest.raises(Crash):
        pretrain(data, ARCH, cfg, seq_len=32, output_dir=tmp_path / "crashed", callbacks=[crash])
    torch.manual_seed(999)
    resumed = pretrain(data, ARCH, cfg, seq_len=32, output_dir=tmp_path / "crashed")
    assert resumed.resumed_from == 12
    a, b = load_file(str(tmp_path / "straight/model/model.safetensors")), load_file(str(tmp_path / "crashed/model/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the saved folder is a plain transformers model with the corpus' tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "straight/model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "straight/model")
    assert model.config.vocab_size == len(tok)
    assert json.loads((tmp_path / "straight/metrics.json").read_text())["steps"] == 24


def test_preprocess_cli(tmp_path):
    from typer.testing import CliRunner

    from qingzhou.cli.main import app

    path, _ = _corpus(tmp_path)
    runner = CliRunner()
    bad = runner.invoke(app, ["preprocess", str(path), str(tmp_path / "out"), "--vocab-size", "10"])
    assert bad.exit_code == 2 and "--vocab-size" in bad.output and "Traceback" not in bad.output
    ok = runner.invoke(app, ["preprocess", str(path), str(path), str(tmp_path / "out"), "--vocab-size", "300",
                             "--min-chars", "50", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["documents"] == 66 and report["exact_duplicates"] == 33  # the second copy is all duplicates
    assert read_index(tmp_path / "out")["vocab_size"] == report["vocab_size"]
