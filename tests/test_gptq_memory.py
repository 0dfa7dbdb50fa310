"""GPTQ's peak memory on a wide linear (what a streamed big model's down_proj sets): a Hessian
handed over to the solver is permuted in place of copies, so at most two more [in, in] float32
matrices than the caller held exist at once (the inverse's factors), against three or more when
the solver copies it; the result is the same."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qingzhou.compress.quantize.gptq_solver import gptq_quantize_weight
from qingzhou.llm.quantized.grid import QuantScheme

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/clear_refs").exists(),
                                reason="peak RSS reset (/proc/self/clear_refs) is Linux only")

N = 3072  # input width: one [N, N] float32 is 36 MiB


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _peak_over_start(fn) -> tuple[int, object]:
    """Peak RSS while `fn` runs, above the RSS when it starts (VmHWM reset first)."""
    Path("/proc/self/clear_refs").write_text("5")
    start = _rss("VmRSS")
    out = fn()
    return _rss("VmHWM") - start, out


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * N, N, generator=g)
    H = X.T @ X / X.shape[0]
    W = torch.randn(48, N, generator=g)
    return W, H


def test_a_handed_over_hessian_is_not_copied_and_gives_the_same_result():
    torch.set_num_threads(2)
    scheme = QuantScheme(bits=4, group_size=128, sym=False, clip_search=False)
    matrix = N * N * 4
    W, H = _problem()
    copied_peak, copied = _peak_over_start(lambda: gptq_quantize_weight(W, H, scheme, act_order=True))  # noqa: B023
    handed = [H]
    H = None
    owned_peak, owned = _peak_over_start(lambda: gptq_quantize_weight(W, handed, scheme, act_order=True))
    assert handed == []  # popped: the caller holds no reference any more
    assert torch.equal(owned.quantized.codes, copied.quantized.codes)
    assert torch.equal(owned.quantized.scales, copied.quantized.scales)
    assert owned_peak <= 2.4 * matrix, owned_peak / matrix
    assert copied_peak - owned_peak >= 0.8 * matrix, (copied_peak / matrix, owned_peak / matrix)


def _print_ratios():  # pragma: no cover - run by hand: python tests/test_gptq_memory.py
    scheme = QuantScheme(bits=4, group_size=128, sym=False, clip_search=False)
    W, H = _problem()
    a, _ = _peak_over_start(lambda: gptq_quantize_weight(W, H, scheme, act_order=True))
    handed = [H]
    H = None
    b, _ = _peak_over_start(lambda: gptq_quantize_weight(W, handed, scheme, act_order=True))
    print(f"copied {a / (N * N * 4):.2f} matrices, handed over {b / (N * N * 4):.2f}")


if __name__ == "__main__":
    _print_ratios()
