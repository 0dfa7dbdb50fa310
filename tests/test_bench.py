"""The speed/memory benchmark: statistics computed from the measured repetitions (checked with a
fake clock), memory accounting by hand, and a real run on a tiny model."""
from __future__ import annotations

import statistics

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

import qingzhou.eval.bench as B

torch.set_num_threads(1)


def tiny(tie=True):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    vocab = {f"t{i}": i for i in range(127)} | {"<eos>": 127}
    t = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")


class FakeClock:
    """perf_counter that advances by k on its k-th call: the duration of the j-th timing is 2j."""

    def __init__(self):
        self.calls, self.now = 0, 0.0

    def perf_counter(self):
        self.calls += 1
        self.now += self.calls
        return self.now


def test_statistics_come_from_the_repetitions(monkeypatch, tok):
    monkeypatch.setattr(B, "time", FakeClock())
    out = B.bench(tiny(), tok, batch_sizes=[2], prompt_tokens=4, new_tokens=3, warmup=1, repeats=2,
                  measure_bandwidth=False, progress=False)
    (r,) = out["results"]
    # clock calls per repetition (10): prefill start/end, 1-token generate start/end, 3-token generate
    # start, 4 streamer stamps (prompt + 3 tokens), end. Call k advances the clock by k, so a span
    # from call a to call b lasts a+1 + ... + b. Repetition 1 (after the warm-up) is calls 11..20,
    # repetition 2 is calls 21..30; decode spans from the first new token's stamp to the last's.
    span = lambda a, b: sum(range(a + 1, b + 1))  # noqa: E731
    prefill = [2 * 4 / span(11, 12), 2 * 4 / span(21, 22)]
    tpot = [span(17, 19) / 2, span(27, 29) / 2]
    assert r["prefill_tokens_per_s"]["mean"] == pytest.approx(statistics.fmean(prefill))
    assert r["prefill_tokens_per_s"]["std"] == pytest.approx(statistics.stdev(prefill))
    assert r["ttft_ms"]["mean"] == pytest.approx(1000 * statistics.fmean([span(13, 14), span(23, 24)]))
    assert r["ttft_ms"]["n"] == 2
    assert r["e2e_s"]["mean"] == pytest.approx(statistics.fmean([span(15, 20), span(25, 30)]))
    assert r["tpot_ms"]["mean"] == pytest.approx(1000 * statistics.fmean(tpot))
    assert r["tpot_ms"]["std"] == pytest.approx(1000 * statistics.stdev(tpot))
    assert r["decode_tokens_per_s"]["mean"] == pytest.approx(statistics.fmean([2 / t for t in tpot]))


def test_weights_bytes_counts_tied_embeddings_once():
    tied, untied = tiny(tie=True), tiny(tie=False)
    per_param = 4  # float32
    n_tied = sum(p.numel() for p in tied.parameters())  # parameters() already deduplicates
    buffers = sum(b.numel() * b.element_size() for b in tied.buffers())
    assert B.weights_bytes(tied) == n_tied * per_param + buffers
    assert B.weights_bytes(untied) - B.weights_bytes(tied) == 128 * 64 * per_param
    assert B.weights_bytes(tied.half()) < B.weights_bytes(tiny(tie=True))


def test_disk_bytes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_text("{}")
    assert B.disk_bytes(tmp_path) == 1000
    assert B.disk_bytes(tmp_path / "model.safetensors") == 1000
    assert B.disk_bytes(None) is None


def test_real_run_on_cpu(tok):
    out = B.bench(tiny(), tok, batch_sizes=[1, 2], prompt_tokens=8, new_tokens=4, warmup=1, repeats=2,
                  bandwidth_mib=8, progress=False)
    assert [r["batch_size"] for r in out["results"]] == [1, 2]
    for r in out["results"]:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "tpot_ms"):
            assert r[key]["mean"] > 0 and r[key]["n"] == 2 and r[key]["std"] is not None
    assert out["env"]["device"] == "cpu" and out["env"]["versions"]["torch"]
    assert out["memory"]["weights_gib"] > 0 and out["memory"]["peak_rss_gib"] > 0
    assert out["roofline"]["copy_bandwidth_gb_s"] > 0
    assert 0 < out["roofline"]["batch1_decode_fraction"]
