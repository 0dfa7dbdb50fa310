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


@pytest.mark.parametrize("settings", [FastDecode(compile=False), FastDecode(backend="eager"),
                                      FastDecode(backend="eager", loop=False)],
                         ids=["static-cache", "static-cache+compiled", "generate-static-cache+compiled"])
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
    decode(model, ids, max_new_tokens=5, fast=FastDecode(compile=False, cache_bucket=64, loop=False), do_sample=False)
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


def _no_generate(model, monkeypatch):
    """Make `model.generate` fail loudly, so a passing call proves the own greedy loop ran."""
    def refuse(**kwargs):
        raise AssertionError("generate() was called; the own greedy loop should have run")

    monkeypatch.setattr(model, "generate", refuse)


@pytest.mark.parametrize("compiled", [False, True], ids=["static-cache", "compiled"])
def test_own_greedy_loop_matches_generate_with_eos_padding_and_min_tokens(lm, monkeypatch, compiled):
    model, tok = lm
    settings = FastDecode(compile=compiled, backend="eager", eos_check_every=3)
    ids = tok(["The river begins in the mountains", "The river ends in a deep cold sea"], return_tensors="pt").input_ids
    free = decode(model, ids, max_new_tokens=20, fast=False, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    # an end-of-sequence id that row 0 first emits at step k (and row 1 later or never): rows finish
    # at different steps, so generate pads the finished row and stops when the last one ends
    k = next(i for i in range(3, 20) if int(free[0, i]) not in free[0, :i].tolist() + [0])
    eos = int(free[0, k])
    cases = [dict(eos_token_id=eos), dict(eos_token_id=eos, min_new_tokens=9), dict(eos_token_id=[eos, 7]), {}]
    refs = [decode(model, ids, max_new_tokens=20, fast=False, do_sample=False, pad_token_id=0, **kw) for kw in cases]
    _no_generate(model, monkeypatch)
    for kw, ref in zip(cases, refs):
        out = decode(model, ids, max_new_tokens=20, fast=settings, do_sample=False, pad_token_id=0, **kw)
        assert torch.equal(out, ref), kw
    n = ids.shape[1]
    assert refs[0][0, n + k] == eos and (refs[0][0, n + k + 1:] == 0).all()  # row 0 ended, then padding
    if k < 9:
        assert refs[1][0, n + k] != eos  # min_new_tokens held the end back
    one = decode(model, ids[:1], max_new_tokens=20, fast=settings, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert one.shape[1] == n + k + 1 and torch.equal(one[0], refs[0][0, : n + k + 1])  # a lone row stops at its end


def test_sampling_and_processors_go_through_generate(lm, monkeypatch):
    model, tok = lm
    ids = tok("abc", return_tensors="pt").input_ids
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or original(**kw))
    settings = FastDecode(compile=False)
    decode(model, ids, max_new_tokens=4, fast=settings, do_sample=False)
    assert calls == []  # plain greedy: the own loop
    decode(model, ids, max_new_tokens=4, fast=settings, do_sample=True, top_k=5)
    decode(model, ids, max_new_tokens=4, fast=settings, do_sample=False, repetition_penalty=1.3)
    decode(model, ids, max_new_tokens=4, fast=settings, do_sample=False, attention_mask=torch.tensor([[0, 1, 1]]))
    decode(model, ids, max_new_tokens=4, fast=FastDecode(compile=False, loop=False), do_sample=False)
    assert len(calls) == 4 and all(c["cache_implementation"] == "static" for c in calls)


class _FakeGraph:
    """Stands in for a captured CUDA graph on CPU: each replay runs the captured step."""

    def __init__(self, state):
        self.state, self.replays = state, 0

    def replay(self):
        self.replays += 1
        self.state.step()


def test_graph_replay_loop_gives_the_same_tokens_and_falls_back_when_capture_fails(lm, monkeypatch):
    """The CUDA-graph branch of the own loop (warm-up steps, capture once, replay per token, EOS
    checks between replays) run on CPU with a stand-in graph; a failing capture decodes on."""
    import importlib

    gen = importlib.import_module("qingzhou.llm.generate")  # the package re-exports a function of that name
    model, tok = lm
    ids = tok(["The river begins in the mountains", "The river ends in a deep cold sea"], return_tensors="pt").input_ids
    ref = decode(model, ids, max_new_tokens=20, fast=False, do_sample=False, pad_token_id=0)
    eos = int(ref[0, ids.shape[1] + 12])
    ref_eos = decode(model, ids, max_new_tokens=20, fast=False, do_sample=False, pad_token_id=0, eos_token_id=eos)
    graphs = []
    monkeypatch.setattr(gen, "_use_graph", lambda model, settings, device: not getattr(model, gen._GRAPH_FAILED, None))
    monkeypatch.setattr(gen, "_side_stream_step", lambda state: state.step())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(gen, "_capture", lambda state: graphs.append(_FakeGraph(state)) or graphs[-1])
    settings = FastDecode(compile=False)
    assert torch.equal(decode(model, ids, max_new_tokens=20, fast=settings, do_sample=False, pad_token_id=0), ref)
    assert len(graphs) == 1 and graphs[0].replays == 20 - 3  # token 0 from prefill, 2 warm-up steps
    out = decode(model, ids, max_new_tokens=20, fast=settings, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(out, ref_eos)

    def broken(state):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(gen, "_capture", broken)
    assert torch.equal(decode(model, ids, max_new_tokens=20, fast=settings, do_sample=False, pad_token_id=0), ref)
    assert "stream is capturing" in getattr(model, gen._GRAPH_FAILED)
