"""The fast generation path (static KV cache + compiled decode step) against eager greedy decoding.

No GPU here, so the compiled step is traced with dynamo's "eager" backend (the same graph capture
and static-cache code path as inductor/CUDA graphs, without a C++ compile); inductor itself was
checked by hand (bench/decode_speed.py --fast-backend inductor)."""
from __future__ import annotations

import logging

import pytest
import torch

from qingzhou.finetune.testing import byte_tokenizer, tiny_model
from qingzhou.llm.generate import FastDecode, decode, fast_status, generate, resolve_fast

PROMPTS = ["The river begins in the mountains", "A much longer prompt, so the static cache length differs a lot!"]


@pytest.fixture()
def lm():
    torch.set_num_threads(1)
    return tiny_model("llama", seed=3), byte_tokenizer()


def _eager(model, tok, prompt, n=24):
    return generate(model, tok, prompt, max_new_tokens=n, chat=False, fast=False)


@pytest.mark.parametrize("settings", [FastDecode(compile=False), FastDecode(backend="eager")],
                         ids=["static-cache", "static-cache+compiled"])
def test_fast_path_gives_the_eager_greedy_tokens(lm, settings):
    model, tok = lm
    for prompt in PROMPTS:  # two lengths: the bucketed static cache serves both
        ref = _eager(model, tok, prompt)
        fast = generate(model, tok, prompt, max_new_tokens=24, chat=False, fast=settings)
        assert fast.new_tokens == ref.new_tokens > 0
        assert fast.text == ref.text
        assert fast.decode_path == ("static+compile" if settings.compile else "static") and ref.decode_path == "eager"
    assert fast_status(model, settings) == ("static+compile" if settings.compile else "static")


def test_fast_path_runs_a_static_cache(lm, monkeypatch):
    model, tok = lm
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    ids = tok("abc", return_tensors="pt").input_ids
    decode(model, ids, max_new_tokens=5, fast=FastDecode(compile=False, cache_bucket=64), do_sample=False)
    assert seen["cache_implementation"] == "static" and seen["max_cache_len"] == 64  # 3 + 5 rounded up
    seen.clear()
    decode(model, ids, max_new_tokens=5, fast=False, do_sample=False)
    assert "cache_implementation" not in seen


def test_auto_means_cuda_only(lm):
    model, _ = lm
    assert resolve_fast(model, "auto") is None  # this model is on the CPU
    assert resolve_fast(model, True) == FastDecode()
    assert fast_status(model, "auto") == "eager"


def test_compile_failure_falls_back_to_eager_once(lm, caplog):
    model, tok = lm
    ref = _eager(model, tok, PROMPTS[0])
    broken = FastDecode(backend="no_such_backend")
    with caplog.at_level(logging.WARNING, logger="qingzhou.llm.generate"):
        out = generate(model, tok, PROMPTS[0], max_new_tokens=24, chat=False, fast=broken)
    assert out.text == ref.text
    assert "fast generation path failed" in caplog.text
    assert fast_status(model, broken).startswith("eager (fast path failed")
    assert resolve_fast(model, broken) is None  # later calls go straight to eager


def test_streaming_on_the_fast_path_prints_the_text_once(lm):
    model, tok = lm
    pieces: list[str] = []
    out = generate(model, tok, PROMPTS[0], max_new_tokens=24, chat=False, fast=FastDecode(compile=False),
                   stream=pieces.append)
    assert "".join(pieces) == out.text == _eager(model, tok, PROMPTS[0]).text


def test_bench_records_the_decode_path(lm):
    from qingzhou.eval.bench import bench

    model, tok = lm
    out = bench(model, tok, batch_sizes=[1], prompt_tokens=8, new_tokens=4, warmup=0, repeats=1,
                measure_bandwidth=False, progress=False, fast=FastDecode(compile=False))
    assert out["config"]["decode_path"] == "static"
    assert out["results"][0]["decode_tokens_per_s"]["mean"] > 0
