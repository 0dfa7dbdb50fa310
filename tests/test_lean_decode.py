"""Lean CPU decoding of 4-bit Llama-family models (issue 19): the same greedy tokens as
transformers' `generate`, streaming included; models it does not cover, or where its first-use
check fails, decode through transformers."""
from __future__ import annotations

import pytest
import torch

from qingzhou.compress.quantize import quantize
from qingzhou.finetune.testing import tiny_model
from qingzhou.llm.generate import decode, fast_status
from qingzhou.llm.quantized import lean_decode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def torch_kernels_only(monkeypatch):
    """These tests hold the torch lean path to transformers' exact tokens; the C step (int8
    activations, tests/test_native_decode.py) is off here."""
    monkeypatch.setenv("QINGZHOU_NATIVE", "0")
PROMPT = torch.tensor([[1, 17, 99, 42, 250, 7, 3, 130]])


def _calib(n=4, length=32):
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 272, (length,), generator=g) for _ in range(n)]


def _q4(arch: str, **overrides):
    model = tiny_model(arch, seed=4, **overrides)
    quantize(model, {"method": "rtn", "bits": 4, "group_size": 32}, _calib())
    return model.eval()


def _reference(model, n, **kw):
    with torch.inference_mode():
        return decode(model, PROMPT, max_new_tokens=n, fast=False, do_sample=False, **kw)


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 64}),
                                            ("llama", {"num_key_value_heads": 4})])
def test_lean_decoding_gives_generates_tokens(arch, overrides):
    model = _q4(arch, **overrides)
    assert lean_decode.why_not(model) is None and fast_status(model, "auto") == "lean"
    with torch.inference_mode():
        got = decode(model, PROMPT, max_new_tokens=24, fast="auto", do_sample=False)
    assert getattr(model, lean_decode._CHECKED, False)  # the lean path ran (and passed its check)
    assert torch.equal(got, _reference(model, 24))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stacked_packs_share_the_layers_memory_and_give_the_same_tokens(arch):
    # 64-wide heads: q (128 rows), k and v (64 each) are whole 64-row blocks of the CPU pack
    model = _q4(arch, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    layers = lean_decode._layers(model, torch.float32)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    stacked = layers[0].qkv if arch == "llama" else layers[0].qkv.pack  # qwen2: the pack + its q/k/v biases
    assert isinstance(stacked, lean_decode.Int4Pack) and stacked.out_features == 256
    assert isinstance(layers[0].gate_up, lean_decode.Int4Pack)
    base = stacked.packed.untyped_storage().data_ptr()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # views into the stacked pack: no second copy
        assert proj.fast_kernel(torch.device("cpu"), torch.float32).packed.untyped_storage().data_ptr() == base
    x = torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        sep = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        assert torch.allclose(layers[0].qkv(x), sep, rtol=1e-5, atol=1e-5)
        assert torch.allclose(layers[0].gate_up(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1), atol=1e-5)
        got = decode(model, PROMPT, max_new_tokens=16, fast="auto", do_sample=False)
    assert getattr(model, lean_decode._CHECKED, False)
    assert torch.equal(got, _reference(model, 16))
    # new scales (a repair, a reload) drop the layers' packs: the kept plan is rebuilt, not reused
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.mlp.up_proj):
            proj.scales.mul_(1.5)
            proj.clear_runtime()
    with torch.inference_mode():
        again = decode(model, PROMPT, max_new_tokens=16, fast="auto", do_sample=False)
    assert lean_decode._layers(model, torch.float32) is not layers
    assert torch.equal(again, _reference(model, 16))
    with torch.inference_mode():
        want, got = model(PROMPT).logits[0, -1], lean_decode.LeanDecoder(model, 16).step(PROMPT)
    assert ((got - want).norm() / want.norm()).item() < 1e-2  # the new weights, not the kept plan's


def test_lean_logits_match_the_models_forward():
    model = _q4("qwen2")  # q/k/v biases
    decoder = lean_decode.LeanDecoder(model, 16)
    with torch.inference_mode():
        first = decoder.step(PROMPT)
        nxt = decoder.step(torch.tensor([[5]]))
        want = model(torch.cat([PROMPT, torch.tensor([[5]])], 1)).logits[0, -2:]
    got = torch.stack([first, nxt])
    # the head differs: one lean row goes through its int8 copy, the forward's 9 rows through bf16
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_eos_min_new_tokens_and_streaming_follow_generate():
    from transformers import TextStreamer

    model = _q4("llama")
    first = int(_reference(model, 1)[0, -1])
    pieces = []

    class Collect(TextStreamer):
        def __init__(self):
            self.skip_prompt, self.seen = True, 0

        def put(self, value):
            self.seen += 1
            if self.seen > 1:
                pieces.append(int(value.reshape(-1)[0]))

        def end(self):
            pieces.append("end")

    for kw in ({"eos_token_id": first}, {"eos_token_id": first, "min_new_tokens": 3}):
        with torch.inference_mode():
            got = decode(model, PROMPT, max_new_tokens=10, fast="auto", do_sample=False, **kw)
        assert torch.equal(got, _reference(model, 10, **kw)), kw
    assert got.shape[1] > PROMPT.shape[1] + 1  # min_new_tokens held the end token back
    with torch.inference_mode():
        got = decode(model, PROMPT, max_new_tokens=6, fast="auto", do_sample=False, streamer=Collect())
    assert pieces == got[0, PROMPT.shape[1]:].tolist() + ["end"]


def test_models_it_does_not_cover_say_why():
    dense = tiny_model("llama")
    assert "4-bit" in lean_decode.why_not(dense) and fast_status(dense, "auto") == "eager"
    assert "architecture 'gemma3_text'" in lean_decode.why_not(tiny_model("gemma3_text"))
    mistral = _q4("mistral", sliding_window=16)
    assert not lean_decode.fits_window(mistral, PROMPT.shape[1] + 12)
    with torch.inference_mode():  # past its window: transformers' path, same as the reference
        assert torch.equal(decode(mistral, PROMPT, max_new_tokens=12, fast="auto", do_sample=False),
                           _reference(mistral, 12))
    assert not getattr(mistral, lean_decode._CHECKED, False)


def test_a_first_use_mismatch_falls_back_to_transformers(monkeypatch, caplog):
    model = _q4("llama")
    monkeypatch.setattr(lean_decode.LeanDecoder, "_rope", lambda self, x, cos, sin: x)  # a wrong lean step
    with torch.inference_mode():
        got = decode(model, PROMPT, max_new_tokens=8, fast="auto", do_sample=False)
    assert torch.equal(got, _reference(model, 8))
    assert "disagrees" in caplog.text and "hidden states disagreed" in lean_decode.why_not(model)
    assert fast_status(model, "auto") == "eager"


def test_rotary_embedding_is_rounded_as_the_models():
    # the o-proj int4 kernel casts its input to bf16, so a last-bit difference here became ~1e-3 in
    # SmolLM2's final hidden state (torch.addcmul's fused multiply-add on AVX2 CPUs): it must be exact
    from transformers.models.llama.modeling_llama import rotate_half

    model = _q4("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    decoder = lean_decode.LeanDecoder(model, 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, 3, 64, generator=g) * 30
    cos, sin = torch.randn(1, 12, 1, 64, generator=g), torch.randn(1, 12, 1, 64, generator=g)
    assert torch.equal(decoder._rope(x, cos, sin), x * cos + rotate_half(x) * sin)
