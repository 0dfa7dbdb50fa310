"""The CPU runtime of quantised models (issue 19): fp32 models run their 4-bit layers through the
int4 kernel in bf16, many rows through a dequantise-to-bf16 GEMM, the head in bf16; results stay
within bf16 rounding of the dequantised fp32 reference; other layers keep an exact cached weight."""
from __future__ import annotations

import pytest
import torch

from qingzhou.finetune.testing import tiny_model
from qingzhou.llm.quantized import int4_kernel
from qingzhou.llm.quantized.grid import QuantScheme, rtn_quantize_weight
from qingzhou.llm.quantized.qlinear import QuantLinear
from qingzhou.llm.quantized.runtime import HEAD_INT8_MAX_ROWS, FastHead, _int8_rows, use_fast_head

U = 2.0**-8  # bf16 unit roundoff (8 significant bits)


def _layer(out_f, in_f, bits=4, group=64, sym=False, act_order=False, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(bits=bits, group_size=group, sym=sym, clip_search=False)
    qw = rtn_quantize_weight(torch.randn(out_f, in_f, generator=g), scheme)
    if act_order:  # GPTQ act-order: columns visited in a random order, groups by visit order
        perm = torch.randperm(in_f, generator=g)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // group).to(torch.int32)
        qw.g_idx = g_idx
    return QuantLinear.from_quantized(qw, bias=torch.randn(out_f, generator=g) if bias else None)


def _within_bf16_rounding(y, layer, x):
    """|y - ref| <= 2u * (|x| @ |W|^T) + u * |ref| + tiny, elementwise: the error of rounding x and W
    to bf16 (fp32 accumulation) and the output to bf16, with the dequantised fp32 weight as reference."""
    w = layer.dequantize_weight()
    ref = torch.nn.functional.linear(x.float(), w, None if layer.bias is None else layer.bias.float())
    bound = 2 * U * (x.float().abs() @ w.abs().T) + U * ref.abs() + 1e-6
    excess = ((y.float() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds bf16 rounding by {excess}"
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1e-2  # not the exact path by accident, and close
    return rel


SHAPES = [  # SmolLM2-135M's layers (576 wide: g128 falls back to g64 there) and a g128 width
    (576, 576, 64), (192, 576, 64), (1536, 576, 64), (576, 1536, 64), (576, 1536, 128), (64, 128, 32),
]


@pytest.mark.parametrize("out_f,in_f,group", SHAPES)
@pytest.mark.parametrize("sym,act_order", [(False, False), (True, False), (False, True)])
def test_fp32_input_takes_the_kernel_within_bf16_rounding(out_f, in_f, group, sym, act_order):
    layer = _layer(out_f, in_f, group=group, sym=sym, act_order=act_order)
    fast = layer.fast_kernel(torch.device("cpu"), torch.float32)
    assert fast is not None and fast.compute_dtype == torch.bfloat16
    assert (fast.perm is not None) == act_order
    for rows in (1, 5):  # decode, small batch: the int4 kernel
        x = torch.randn(rows, in_f)
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (rows, out_f)
        _within_bf16_rounding(y, layer, x)


@pytest.mark.parametrize("gemm_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act_order", [False, True])
def test_many_rows_take_the_gemm_route_and_agree_with_the_kernel(act_order, gemm_dtype):
    """bf16 GEMM where the CPU has one (AVX-512/AMX), fp32 where it does not (plain AVX2): both
    routes are tried here, whatever this machine has."""
    layer = _layer(192, 576, act_order=act_order)
    fast = layer.fast_kernel(torch.device("cpu"), torch.float32)
    assert fast.gemm_dtype == int4_kernel.cpu_gemm_dtype()
    fast.gemm_dtype = gemm_dtype
    rows = int4_kernel.CPU_KERNEL_MAX_ROWS + 44
    x = torch.randn(2, rows // 2, 576)
    with torch.no_grad():
        y_gemm = layer(x)
        limit, fast.max_rows = fast.max_rows, None  # force the kernel route on the same input
        y_kernel = layer(x)
        fast.max_rows = limit
    assert limit == int4_kernel.CPU_KERNEL_MAX_ROWS and not torch.equal(y_gemm, y_kernel)
    _within_bf16_rounding(y_gemm.reshape(rows, -1), layer, x.reshape(rows, -1))
    _within_bf16_rounding(y_kernel.reshape(rows, -1), layer, x.reshape(rows, -1))


@pytest.mark.parametrize("out_f", [96, 192, 80])  # 80: a 64-row block and a 16-row tail
def test_the_pack_reads_back_its_codes_and_the_kernels_weight(out_f):
    """The GEMM route's weight is the one the kernel computes with: the kernel applied to the
    identity gives it back, and the codes read from the pack are the layer's own."""
    layer = _layer(out_f, 128, group=32, act_order=True)
    fast = layer.fast_kernel(torch.device("cpu"), torch.float32)
    assert fast.block is not None
    assert torch.equal(fast.codes().long(), layer.codes()[:, fast.perm])
    got = fast.dequantize(torch.bfloat16)
    eye = torch.eye(128, dtype=torch.bfloat16)
    assert torch.equal(got.T, fast.matmul(eye, fast.packed, 32, fast.scales_and_zeros))
    want = layer.dequantize_weight()[:, fast.perm]
    scale = layer.scales.float().T[:, layer.g_idx.long()][:, fast.perm]  # each weight's group scale
    # bf16 scale and zero term (|code - 8|, |8 - zero| <= 8 steps each), then the result rounded
    assert ((got.float() - want).abs() <= 16 * U * scale + U * want.abs() + 1e-6).all()


def test_a_compact_layer_drops_qweight_and_gives_it_back_exactly(tmp_path):
    """`compact_when_packed`: after the first CPU forward the layer holds its codes once (the pack);
    its outputs do not change, and `state_dict`, `codes()`, `.to()` and saving see the real `qweight`."""
    layer = _layer(192, 576, act_order=True)
    twin = _layer(192, 576, act_order=True)
    qweight = layer.qweight.clone()
    layer.compact_when_packed = True
    x = torch.randn(3, 576)
    with torch.no_grad():
        y, y_twin = layer(x), twin(x)
    assert layer.is_compact() and not twin.is_compact()
    assert torch.equal(y, y_twin)
    assert layer.qweight.untyped_storage().nbytes() == 4 and layer.qweight.shape == qweight.shape
    assert torch.equal(layer.state_dict()["qweight"], qweight)
    assert torch.equal(layer.codes(), twin.codes())
    with torch.no_grad():  # many rows: the GEMM route reads the pack
        big = torch.randn(int4_kernel.CPU_KERNEL_MAX_ROWS + 1, 576)
        assert torch.equal(layer(big), twin(big))
    fresh = _layer(192, 576, seed=1)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.qweight, qweight)
    layer.to(torch.float32)  # `.to()` moves the real buffer
    assert not layer.is_compact() and torch.equal(layer.qweight, qweight)
    with torch.no_grad():
        assert torch.equal(layer(x), y) and layer.is_compact()
    layer.load_state_dict(_layer(192, 576, seed=2).state_dict())  # new weights replace the codes
    assert not layer.is_compact() and torch.equal(layer.qweight, _layer(192, 576, seed=2).qweight)


@pytest.mark.parametrize("bits,group,in_f", [(3, 64, 576), (8, 64, 576), (4, 48, 144)])
def test_layers_the_kernel_cannot_take_cache_an_exact_weight(bits, group, in_f):
    layer = _layer(64, in_f, bits=bits, group=group)
    assert layer.fast_kernel(torch.device("cpu"), torch.float32) is None
    x = torch.randn(3, in_f)
    ref = torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
    with torch.no_grad():
        y1 = layer(x)
        assert layer._cached is not None and layer._cached.dtype == torch.float32
        y2 = layer(x)
    torch.testing.assert_close(y1, ref, rtol=0, atol=1e-5)
    assert torch.equal(y1, y2)
    layer.load_state_dict(_layer(64, in_f, bits=bits, group=group, seed=1).state_dict())
    assert layer._cached is None  # new weights: the cache is dropped


def test_training_does_not_keep_a_cached_weight():
    layer = _layer(64, 576, bits=3)
    x = torch.randn(2, 576, requires_grad=True)
    layer(x).sum().backward()
    assert layer._cached is None and x.grad is not None


def _quantized_tiny(bits=4):
    from qingzhou.compress.quantize import quantize

    model = tiny_model("llama", tie_word_embeddings=True)
    quantize(model, {"method": "rtn", "bits": bits, "group_size": 32})
    return model.eval()


IDS = torch.tensor([[3, 17, 99, 250, 42, 7, 7, 130]])


def test_a_4bit_model_gets_the_fast_head_tied_and_within_rounding(tmp_path):
    from qingzhou.compress.quantize import load_quantized, save_quantized

    model = _quantized_tiny()
    head = model.get_output_embeddings()
    assert isinstance(head, FastHead) and head.weight is model.get_input_embeddings().weight
    keys = set(model.state_dict())
    with torch.no_grad():
        fast = model(IDS).logits
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.kernel = "dequant"
        assert use_fast_head(model, False) is False
        assert type(model.get_output_embeddings()) is torch.nn.Linear
        exact = model(IDS).logits
    assert set(model.state_dict()) == keys
    rel = ((fast - exact).norm() / exact.norm()).item()
    assert 0 < rel < 2e-2
    assert fast.argmax(-1).eq(exact.argmax(-1)).float().mean() > 0.8
    use_fast_head(model, True)
    save_quantized(model, None, tmp_path / "q")
    again = load_quantized(tmp_path / "q")
    assert isinstance(again.get_output_embeddings(), FastHead)


def test_fast_head_is_exact_with_autograd_and_follows_weight_changes():
    model = _quantized_tiny()
    head = model.get_output_embeddings()
    h = torch.randn(2, head.in_features)
    exact = torch.nn.functional.linear(h, head.weight)
    torch.testing.assert_close(head(h), exact, rtol=0, atol=0)  # grad enabled: fp32
    with torch.no_grad():
        approx = head(h)
        assert not torch.equal(approx, exact) and torch.allclose(approx, exact, rtol=2e-2, atol=2e-2)
        head.weight.mul_(2)
        torch.testing.assert_close(head(h), 2 * approx, rtol=2e-2, atol=2e-2)


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16-gemm-cpu", "avx2-cpu"])
def gemm_dtype(request, monkeypatch):
    """Both kinds of CPU, whatever this one is: with a fast bf16 GEMM (many rows through a bf16
    copy) and without (plain AVX2: many rows through the weight itself)."""
    monkeypatch.setattr(int4_kernel, "cpu_gemm_dtype", lambda: request.param)
    return request.param


def test_fast_head_decodes_from_its_int8_copy_and_many_rows_by_the_cpus_gemm(gemm_dtype):
    model = _quantized_tiny()
    head = model.get_output_embeddings()
    w = head.weight.detach()
    codes, scale = _int8_rows(w)
    deq = codes.float() * scale.float()[:, None]
    # per-row symmetric int8: each weight within half a step (+ the bf16 rounding of the scale)
    assert ((deq - w).abs() <= scale.float()[:, None] * (0.5 + 127 * U) + 1e-7).all()
    with torch.no_grad():
        for rows in (1, HEAD_INT8_MAX_ROWS):
            h = torch.randn(rows, head.in_features)
            y = head(h)
            assert y.dtype == torch.float32 and "int8" in head._copies and "bf16" not in head._copies
            via_int8 = h.to(torch.bfloat16).float() @ deq.T
            assert ((y - via_int8).norm() / via_int8.norm()).item() < 1e-2  # bf16 output rounding
            exact = torch.nn.functional.linear(h, w)
            rel = ((y - exact).norm() / exact.norm()).item()
            assert 0 < rel < 2e-2 and y.argmax(-1).eq(exact.argmax(-1)).all()
        many = torch.randn(HEAD_INT8_MAX_ROWS + 1, head.in_features)
        y = head(many)
        exact = torch.nn.functional.linear(many, w)
        if gemm_dtype == torch.float32:  # the weight itself, no copy
            assert "bf16" not in head._copies and torch.equal(y, exact)
        else:
            assert "bf16" in head._copies
            bound = 2 * U * (many.abs() @ w.abs().T) + U * exact.abs() + 1e-6
            assert ((y - exact).abs() <= bound).all()  # the bf16 copy: bf16 rounding only


def test_fast_head_falls_back_to_the_gemm_where_the_int8_kernel_does_not_tile(gemm_dtype):
    head = FastHead(torch.nn.Linear(40, 300, bias=True))  # 40 inputs: not a multiple of 16
    h = torch.randn(1, 40)
    with torch.no_grad():
        y = head(h)
    assert head._copies["int8"][1] is None and ("bf16" in head._copies) == (gemm_dtype == torch.bfloat16)
    torch.testing.assert_close(y, torch.nn.functional.linear(h, head.weight, head.bias), rtol=2e-2, atol=2e-2)


def test_a_bf16_model_gets_the_fast_head_only_when_held_wholly_in_memory():
    from qingzhou.compress.quantize import quantize

    model = tiny_model("llama", tie_word_embeddings=True).to(torch.bfloat16)
    quantize(model, {"method": "rtn", "bits": 4, "group_size": 32})
    head = model.get_output_embeddings()
    assert isinstance(head, FastHead) and head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        one = model(IDS[:, :1]).logits  # a decode row: the int8 copy
        assert "int8" in head._copies and head._copies["int8"][1] is not None
        exact = torch.nn.functional.linear(model.model(IDS[:, :1]).last_hidden_state, head.weight)  # normed already
    assert ((one.float() - exact.float()).norm() / exact.float().norm()).item() < 2e-2
    model.qingzhou_offload = {"streamed_modules": ["model.layers.1"]}  # as load_model marks a budgeted model
    assert use_fast_head(model, False) is False and use_fast_head(model) is False


def test_models_without_kernel_layers_keep_the_fp32_head():
    model = _quantized_tiny(bits=3)
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_a_pass_keeps_the_many_rows_weight_and_drops_it_after(gemm_dtype):
    """`keep_dequantized` (perplexity windows, log-likelihood batches): the many-rows route's
    dequantised weight is made once and reused across forwards with identical logits, freed on
    leaving; with no memory share to spare it is not kept at all."""
    from qingzhou.llm.quantized.runtime import keep_dequantized

    model = _quantized_tiny()
    ids = torch.randint(0, model.config.vocab_size, (3, 100))  # 300 rows: the GEMM route
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        packs = [p for m in layers for p in m._fast.values() if p is not None]
        assert len(packs) == len(layers) and all(p.gemm_weight is None for p in packs)
        with keep_dequantized(model) as kept:
            first = model(input_ids=ids).logits
            held = [p.gemm_weight for p in packs]
            second = model(input_ids=ids).logits
            assert kept and all(w is not None and w.dtype == gemm_dtype for w in held)
            assert all(p.gemm_weight is w for p, w in zip(packs, held))  # reused, not rebuilt
        assert all(p.gemm_weight is None for p in packs) and not any(m.keep_dequantized for m in layers)
        assert torch.equal(first, plain) and torch.equal(second, plain)
        with keep_dequantized(model, share=0.0) as kept:
            model(input_ids=ids)
            assert not kept and all(p.gemm_weight is None for p in packs)
