"""The C decode step (issue 19: qingzhou/llm/quantized/native.py): one call per token, int4 x int8
dot products. Its logits follow the torch lean step within int8 rounding on every architecture lean
decoding covers, its greedy picks are tokens the exact path ranks (near) first, its perplexity on
the real model equals the torch step's, new weights rebuild it, and a wrong C step is caught by the
first-use check and turned off."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from qingzhou.compress.quantize import quantize
from qingzhou.finetune.testing import tiny_model
from qingzhou.llm.generate import decode
from qingzhou.llm.quantized import lean_decode, native

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")]
PROMPT = torch.tensor([[1, 17, 99, 42, 250, 7, 3, 130]])


def _q4(arch: str, group_size: int = 32, **overrides):
    model = tiny_model(arch, seed=4, **overrides)
    g = torch.Generator().manual_seed(2)
    calib = [torch.randint(0, 272, (32,), generator=g) for _ in range(4)]
    quantize(model, {"method": "rtn", "bits": 4, "group_size": group_size}, calib)
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _teacher_forced(model, ids: torch.Tensor, native_ok: bool) -> torch.Tensor:
    """Logits [T, vocab] of every position after the first, one token per step."""
    decoder = lean_decode.LeanDecoder(model, ids.shape[1] + 1, native_ok=native_ok)
    assert (decoder.native is not None) == native_ok
    out = [decoder.step(ids[:, :1])]
    out += [decoder.step(ids[:, i:i + 1]) for i in range(1, ids.shape[1] - 1)]
    return torch.stack(out)


@pytest.mark.parametrize("arch,overrides,group", [("llama", {}, 32), ("qwen2", {}, 64), ("mistral", {}, 32),
                                                  ("llama", {"num_key_value_heads": 4}, 128),
                                                  # attention wider than the hidden and MLP sizes (sizes the buffers)
                                                  ("llama", {"hidden_size": 64, "num_attention_heads": 4,
                                                             "num_key_value_heads": 2, "head_dim": 64,
                                                             "intermediate_size": 96}, 32)])
def test_the_c_step_follows_the_torch_step_within_int8_rounding(arch, overrides, group):
    model = _q4(arch, group, **overrides)
    assert native.why_not(model) is None
    ids = torch.cat([PROMPT, torch.randint(0, 272, (1, 24), generator=torch.Generator().manual_seed(5))], 1)
    with torch.inference_mode():
        want, got = _teacher_forced(model, ids, False), _teacher_forced(model, ids, True)
    errs = [_rel(g, w) for g, w in zip(got, want)]
    assert max(errs) < 3e-2, errs  # int8 activations per 32 (the torch step: bf16)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def _c_logits(model, lib, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits of `ids[1:]` through the C step of library `lib` (prefill on torch)."""
    decoder = lean_decode.LeanDecoder(model, ids.shape[1] + 1)
    decoder.native = native.load_model(model, lib)
    out = [decoder.step(ids[:, :1])]
    out += [decoder.step(ids[:, i:i + 1]) for i in range(1, ids.shape[1] - 1)]
    return torch.stack(out)


@pytest.mark.parametrize("flags", [("-O3",), ("-O3", "-mavx2", "-mfma", "-fopenmp")], ids=["portable-c", "avx2"])
def test_every_build_of_the_c_step_computes_the_same_logits(flags):
    """The plain C loops (CPUs without AVX2, or a compiler without OpenMP) and the AVX2 build without
    VNNI compute the same integer dot products as this machine's own build, in another float order (an
    activation on a rounding boundary may then round to the next int8 step)."""
    if flags != ("-O3",) and " avx2 " not in f" {native._cpu_id()} ".replace("\n", " "):
        pytest.skip("this CPU has no AVX2")
    lib = native.build(flags)
    assert lib is not None and lib.qz_simd() == (flags != ("-O3",))
    model = _q4("qwen2", 64)
    ids = torch.cat([PROMPT, torch.randint(0, 272, (1, 8), generator=torch.Generator().manual_seed(5))], 1)
    with torch.inference_mode():
        want, got = _c_logits(model, native.library(), ids), _c_logits(model, lib, ids)
    errs = [_rel(g, w) for g, w in zip(got, want)]
    # float order alone: ~1e-7; a step where an activation flips to the next int8 step: a few 1e-3
    assert sorted(errs)[len(errs) // 2] < 1e-5 and max(errs) < 1e-2, errs


def test_greedy_runs_the_c_step_after_its_check_and_picks_the_exact_paths_best_tokens():
    model = _q4("llama")
    with torch.inference_mode():
        got = decode(model, PROMPT, max_new_tokens=20, fast="auto", do_sample=False)
        assert native.checked(model) and getattr(model, lean_decode._CHECKED)
        # every token picked is one the exact (dequantised fp32) model ranks within rounding of its best
        logits = model(got).logits[0, PROMPT.shape[1] - 1: -1]
    picked = logits.gather(1, got[0, PROMPT.shape[1]:, None])[:, 0]
    assert (logits.max(-1).values - picked <= 0.05 * logits.std(-1)).all()


def test_new_weights_rebuild_the_c_model():
    model = _q4("llama")
    with torch.inference_mode():
        first = lean_decode.LeanDecoder(model, 16).native
        assert native.native_model(model) is first  # kept on the model
        for layer in model.model.layers:
            layer.mlp.up_proj.scales.mul_(1.5)
            layer.mlp.up_proj.clear_runtime()
        decoder = lean_decode.LeanDecoder(model, 16)
        assert decoder.native is not first
        decoder.step(PROMPT[:, :-1])
        got = decoder.step(PROMPT[:, -1:])
        want = model(PROMPT).logits[0, -1]
    assert _rel(got, want) < 3e-2


def test_a_wrong_c_step_is_caught_and_turned_off(caplog):
    model = _q4("llama")
    built = native.native_model(model)
    lean_decode.LeanDecoder(model, 4)  # packs built: the kept C model stays valid
    built = native.native_model(model)
    for t in built.keep:  # scramble the C step's copy of the codes (uint8 tensors): a layout bug
        if t.dtype == torch.uint8:
            t.copy_(t.flip(-1))
    with torch.inference_mode():
        got = decode(model, PROMPT, max_new_tokens=8, fast="auto", do_sample=False)
        want = decode(model, PROMPT, max_new_tokens=8, fast=False, do_sample=False)
    assert torch.equal(got, want)  # that call went through transformers
    assert "native decode step disagrees" in caplog.text
    assert "first-use check failed" in native.why_not(model)
    with torch.inference_mode():  # later calls: the torch lean path, checked
        again = decode(model, PROMPT, max_new_tokens=8, fast="auto", do_sample=False)
    assert torch.equal(again, want) and getattr(model, lean_decode._CHECKED) and not native.checked(model)


def test_models_the_c_step_does_not_take_say_why(monkeypatch):
    model = _q4("llama")
    attn = model.model.layers[0].self_attn
    _permute(attn.q_proj, 0)
    _permute(attn.k_proj, 1)  # q and k read one input in two orders: not one gather
    assert "column orders differ" in native.why_not(model)
    assert "dtype" in native.why_not(_q4("llama").to(torch.bfloat16))
    monkeypatch.setenv("QINGZHOU_NATIVE", "0")
    model = _q4("llama")
    assert native.why_not(model) == "QINGZHOU_NATIVE=0" and lean_decode.LeanDecoder(model, 4).native is None


def _permute(lin, seed: int) -> None:
    """Give `lin` act-order groups (a g_idx that visits the columns in a random order), as GPTQ
    checkpoints quantised with desc_act and without static groups have them."""
    perm = torch.randperm(lin.in_features, generator=torch.Generator().manual_seed(seed))
    lin.g_idx[perm] = (torch.arange(lin.in_features) // lin.group_size).to(torch.int32)
    lin.clear_runtime()


def test_act_order_layers_run_in_the_c_step_with_the_torch_steps_logits():
    model = _q4("qwen2", 32)
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            _permute(lin, 10 * i)  # one input: one order for the three
        _permute(a.o_proj, 10 * i + 1)
        for lin in (m.gate_proj, m.up_proj):
            _permute(lin, 10 * i + 2)
        _permute(m.down_proj, 10 * i + 3)
    assert native.why_not(model) is None
    ids = torch.cat([PROMPT, torch.randint(0, 272, (1, 16), generator=torch.Generator().manual_seed(5))], 1)
    with torch.inference_mode():
        want, got = _teacher_forced(model, ids, False), _teacher_forced(model, ids, True)
        exact = model(ids).logits[0, :-1]  # the dequantising path reads g_idx directly
    assert _rel(want, exact) < 1e-2  # the torch step (its packs gather by the same order) is right
    errs = [_rel(g, w) for g, w in zip(got, want)]
    assert max(errs) < 3e-2, errs
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_smollm2_perplexity_through_the_c_step_equals_the_torch_steps(smollm2):
    """The real model, 4-bit RTN g64, 256 WikiText-2 tokens teacher-forced one at a time."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
    if not path.exists():
        pytest.skip("../shared/data is not here")
    model, tok = smollm2
    model = copy.deepcopy(model)
    quantize(model, {"method": "rtn", "bits": 4, "group_size": 64, "clip_search": False})
    ids = tok(path.read_text()[:8000], return_tensors="pt").input_ids[:, :257]
    with torch.inference_mode():
        ppl = {}
        for ok in (False, True):
            logits = _teacher_forced(model.eval(), ids, ok)
            nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:])
            ppl[ok] = math.exp(nll.item())
    assert abs(ppl[True] / ppl[False] - 1) < 5e-3, ppl


def test_a_deep_copy_builds_its_own_c_model():
    model = _q4("llama")
    lean_decode.LeanDecoder(model, 4)
    first = native.native_model(model)
    clone = copy.deepcopy(model)  # the C handle is not copied (it points into the original's tensors)
    with torch.inference_mode():
        lean_decode.LeanDecoder(clone, 4)
        assert native.native_model(clone) is not first and native.native_model(model) is first


def test_bytes_per_step_count_what_the_c_step_reads():
    model = _q4("llama", 32)
    lean_decode.LeanDecoder(model, 4)
    cfg, built = model.config, native.native_model(model)
    linears = [m for m in model.modules() if isinstance(m, native.QuantLinear)]
    codes = sum(m.out_features * m.in_features // 2 for m in linears)
    groups = sum(m.out_features * m.in_features // 32 * 2 * 4 for m in linears)  # fp32 scale + offset
    head = cfg.vocab_size * cfg.hidden_size * (1 + 4 / 32)  # int8 + fp32 per 32
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size * 4
    assert built.bytes_per_step == codes + groups + head + norms  # no fp32 embedding or head
