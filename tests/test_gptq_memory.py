"""GPTQ's peak memory on a wide linear (what a streamed big model's down_proj sets): a Hessian
handed over to the solver is permuted in place of copies, so its peak holds about one [in, in]
float32 matrix less than when the solver copies it (measured here: 2.4 against 3.4 matrices above
the caller's), and the result is the same."""
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


def _peak_in_fresh_process(mode: str) -> float:
    """Extra peak RSS, in [N, N] matrices, of one solver call in its own interpreter: in a long test
    session freed pages are reused without showing in the peak, so only a fresh process measures."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["matrices"]


def test_a_handed_over_hessian_is_not_copied_and_gives_the_same_result():
    scheme = QuantScheme(bits=4, group_size=128, sym=False, clip_search=False)
    W, H = _problem()
    copied = gptq_quantize_weight(W, H, scheme, act_order=True)
    handed = [H]
    H = None
    owned = gptq_quantize_weight(W, handed, scheme, act_order=True)
    assert handed == []  # popped: the caller holds no reference any more
    assert torch.equal(owned.quantized.codes, copied.quantized.codes)
    assert torch.equal(owned.quantized.scales, copied.quantized.scales)
    copied_peak, owned_peak = _peak_in_fresh_process("copied"), _peak_in_fresh_process("handed")
    assert owned_peak <= 2.7, owned_peak  # the inverse's two factors (+ W-sized buffers)
    assert copied_peak - owned_peak >= 0.8, (copied_peak, owned_peak)


def _measure(mode: str) -> None:  # one solver call; prints its extra peak in matrices
    import json

    torch.set_num_threads(2)
    scheme = QuantScheme(bits=4, group_size=128, sym=False, clip_search=False)
    W, H = _problem()
    arg = [H] if mode == "handed" else H
    H = None
    peak, _ = _peak_over_start(lambda: gptq_quantize_weight(W, arg, scheme, act_order=True))
    print(json.dumps({"mode": mode, "matrices": peak / (N * N * 4)}))


if __name__ == "__main__":
    _measure(sys.argv[1] if len(sys.argv) > 1 else "handed")
