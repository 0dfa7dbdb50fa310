"""Perplexity against a direct computation on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from qingzhou.data.corpus import load_text, wikitext_rows_text
from qingzhou.errors import DataError
from qingzhou.eval.perplexity import perplexity
from qingzhou.llm import load_model


def test_perplexity_is_exp_of_mean_token_nll(tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir), device="cpu")
    text = load_text("builtin:corpus")[:3000]
    ids = tok(text).input_ids
    seq = 64
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - seq + 1, seq):
            window = torch.tensor([ids[start : start + seq]])
            logp = torch.log_softmax(model(window).logits[0, :-1].double(), -1)
            target = window[0, 1:]
            nll -= logp[torch.arange(seq - 1), target].sum().item()
            n += seq - 1
    res = perplexity(model, tok, text, seq_len=seq, progress=False)
    assert res.windows == len(ids) // seq and res.tokens == n
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    batched = perplexity(model, tok, text, seq_len=seq, batch_size=4, progress=False)
    assert batched.ppl == pytest.approx(res.ppl, rel=1e-4)
    assert perplexity(model, tok, text, seq_len=seq, max_windows=2, progress=False).windows == 2


def test_text_shorter_than_a_window_is_an_error(tiny_llama_dir):
    model, tok = load_model(str(tiny_llama_dir), device="cpu")
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(model, tok, "short text", seq_len=128, progress=False)
    with pytest.raises(DataError, match="longer than the model's context"):
        perplexity(model, tok, "short text", seq_len=100000, progress=False)


def test_wikitext_rows_join_matches_the_datasets_convention():
    raw = " = Title = \n \n Some text .\n"
    assert wikitext_rows_text(raw) == " = Title = \n" + "\n\n" + "" + "\n\n" + " Some text .\n"


def test_missing_text_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="text file not found"):
        load_text(str(tmp_path / "none.txt"))
    with pytest.raises(DataError, match="Did you mean 'corpus'"):
        load_text("builtin:corpsu")
