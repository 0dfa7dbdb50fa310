"""The Triton int4 GEMV for CUDA decode rows (issue 19), run on the CPU through Triton's interpreter:
the same program, so its GPTQ-layout indexing, grouping, masking and split-K are checked here; on a
GPU `Int4Pack.build` keeps it only where it measured faster than torch's int4 kernel."""
from __future__ import annotations

import os

import pytest
import torch

from qingzhou.llm.quantized import int4_kernel, triton_gemv
from qingzhou.llm.quantized.grid import QuantScheme, rtn_quantize_weight
from qingzhou.llm.quantized.qlinear import QuantLinear

pytest.importorskip("triton")
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the CPU runs Triton kernels only in its interpreter (tests/conftest.py)")


def _layer(out_f: int, in_f: int, group: int, sym: bool = False, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    qw = rtn_quantize_weight(torch.randn(out_f, in_f, generator=g), QuantScheme(bits=4, group_size=group, sym=sym,
                                                                               clip_search=False))
    return QuantLinear.from_quantized(qw)


def _pack(layer: QuantLinear, dtype=torch.float32) -> triton_gemv.GemvPack:
    return triton_gemv.GemvPack.build(layer.codes(), layer.scales, layer.zero_points(), layer.group_size, CPU, dtype)


@pytest.mark.parametrize("out_f,in_f,group,rows,split", [(100, 256, 64, 1, 2), (192, 576, 64, 3, 3),
                                                         (64, 512, 128, 4, 4), (130, 96, 32, 1, 1),
                                                         (72, 512, 256, 2, 2)])
def test_the_kernel_computes_the_gptq_layers_product(out_f, in_f, group, rows, split):
    layer = _layer(out_f, in_f, group, sym=group == 128)
    pack = _pack(layer)
    pack.split_k = split  # programs over the input dimension, summed by atomic adds
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1))
    want = x @ layer.dequantize_weight().T
    got = pack(x)
    assert got.shape == want.shape and ((got - want).norm() / want.norm()).item() < 1e-5
    assert torch.equal(pack.qweight, layer.qweight)  # it reads the GPTQ words as stored


def test_split_k_fills_the_device_and_divides_the_blocks():
    assert triton_gemv._split_k(blocks=32, n_tiles=32, target=528) == 32  # 2048-wide, 132 SMs x 4
    assert triton_gemv._split_k(blocks=128, n_tiles=128, target=528) == 8
    assert triton_gemv._split_k(blocks=9, n_tiles=100, target=50) == 1
    for blocks in (9, 32, 96):
        assert blocks % triton_gemv._split_k(blocks, 3, 40) == 0


def _check_inputs(layer: QuantLinear) -> tuple:
    """decode_gemv's arguments but the incumbent: the layer and Int4Pack.build's check (x, reference)."""
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(3))
    return (layer.codes(), layer.scales, layer.zero_points(), layer.group_size, x, x @ layer.dequantize_weight().T)


def test_the_kernel_is_kept_only_where_it_measured_faster():
    layer = _layer(64, 256, 64)
    args = _check_inputs(layer)
    dense = layer.dequantize_weight()
    # on the CPU the interpreted kernel is far slower than a dense matmul: refused
    assert int4_kernel.decode_gemv(*args, incumbent=lambda x: x @ dense.T) is None
    pack = _pack(layer)
    # against a strictly slower real computation (the kernel itself, three times over): kept
    kept = int4_kernel.decode_gemv(*args, incumbent=lambda x: [pack(x) for _ in range(3)][-1])
    assert isinstance(kept, triton_gemv.GemvPack)


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("QINGZHOU_TRITON_GEMV", "0")
    layer = _layer(64, 256, 64)
    pack = _pack(layer)
    assert int4_kernel.decode_gemv(*_check_inputs(layer), incumbent=lambda x: [pack(x) for _ in range(3)][-1]) is None


def test_an_int4_pack_sends_decode_rows_to_it_and_prompts_to_the_gemm():
    layer = _layer(128, 256, 64)
    fast = layer.fast_kernel(CPU, torch.bfloat16)
    assert fast is not None and fast.gemv is None  # never built on the CPU
    fast.gemv = _pack(layer, torch.bfloat16)  # as Int4Pack.build attaches it on CUDA
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert torch.equal(fast(x[:2]), fast.gemv(x[:2]))  # decode rows: the GEMV
    many = fast(x)  # 300 rows: the dequantise + GEMM route, not the GEMV
    want = x.float() @ layer.dequantize_weight().T
    assert ((many.float() - want).norm() / want.norm()).item() < 2e-2
