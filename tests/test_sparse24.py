"""2:4 sparse-kernel conversion: mask validation, the decision rule, the CPU no-op, and (only where
a CUDA GPU is present) that converted layers compute what the dense ones do."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qingzhou.compress.prune import prune
from qingzhou.compress.prune.sparse24 import Sparse24Config, check_24, decide, sparsify_24
from qingzhou.errors import ModelLoadError
from qingzhou.finetune.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def pruned_24(arch: str = "llama"):
    model = tiny_model(arch)
    prune(model, {"method": "magnitude", "nm": "2:4"})
    return model


def test_cpu_conversion_is_a_reported_no_op():
    model = pruned_24()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = sparsify_24(model)
    assert report.device == "cpu" and not report.converted
    assert len(report.dense) == 14 and set(report.dense.values()) == {"not on CUDA"}
    assert "no CUDA device" in report.notes[0]
    assert report.summary()["converted"] == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_refuses_a_weight_that_is_not_24():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])  # second group keeps 3 of 4
    with pytest.raises(ModelLoadError, match=r"not 2:4 sparse: 1 of 2 groups"):
        check_24(w, "layers.0.mlp.up_proj")
    check_24(torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 1.0, 0.0, 3.0]]))  # fine
    with pytest.raises(ModelLoadError, match="not a multiple of 4"):
        check_24(torch.ones(2, 6))


def test_model_that_is_not_24_is_refused_or_left_dense():
    model = tiny_model("llama")  # dense random weights
    with pytest.raises(ModelLoadError, match="model.layers.0.self_attn.q_proj is not 2:4"):
        sparsify_24(model)
    report = sparsify_24(model, {"strict": False})
    assert all("not 2:4" in why for why in report.dense.values()) and len(report.dense) == 14


def test_decision_needs_a_measured_speedup_at_every_row_count():
    cfg = Sparse24Config(rows=[1, 2048], backends=["cusparselt", "cutlass"])
    slow_at_1 = {"ms": {1: {"dense": 0.02, "cusparselt": 0.4, "cutlass": 0.1},
                        2048: {"dense": 1.0, "cusparselt": 0.7, "cutlass": 0.8}}, "errors": {}}
    path, why = decide(slow_at_1, cfg)
    assert path is None and why.startswith("dense faster: best 2:4 path cutlass")  # cutlass: worst 0.2x > 0.05x
    at_2048 = {"ms": {2048: slow_at_1["ms"][2048]}, "errors": {}}  # measured for prefill only
    path, why = decide(at_2048, cfg)
    assert path == "cusparselt" and "2048 rows 1.43x" in why
    assert decide(slow_at_1, cfg.model_copy(update={"min_speedup": 0}))[0] == "cutlass"
    failed = {"ms": {2048: {"dense": 1.0}}, "errors": {"cusparselt": "RuntimeError: no"}}
    path, why = decide(failed, Sparse24Config(backends=["cusparselt"]))
    assert path is None and "no 2:4 path ran: cusparselt: RuntimeError: no" == why


def test_bench_runs_on_cpu_and_says_no_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the bench measures instead")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "sparse24_speed.py")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no CUDA device" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 kernels need a CUDA GPU")
def test_forced_conversion_matches_dense_on_cuda():
    model = tiny_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    prune(model, {"method": "magnitude", "nm": "2:4"})
    model = model.to("cuda", torch.float16)
    x = torch.randint(5, 272, (2, 64), device="cuda")
    with torch.no_grad():
        ref = model(x).logits.float()
        report = sparsify_24(model, {"min_speedup": 0, "rows": [128], "iters": 3, "warmup": 1})
        assert report.converted, report.to_dict()
        out = model(x).logits.float()
    assert (out - ref).abs().max() / ref.abs().max() < 2e-2


@pytest.mark.parametrize("backend", ["cusparselt-direct", "cutlass-direct"])
def test_direct_2to4_layers_build_and_keep_their_buffers(backend, monkeypatch):
    """Building the direct layers needs no GPU for CUTLASS (cuSPARSELt's compress is stubbed): both
    register `packed` and `meta` (None for cuSPARSELt, which keeps its metadata inside `packed`)."""
    import torch

    from qingzhou.compress.prune.masks import nm_mask
    from qingzhou.compress.prune.sparse24 import Sparse24Linear

    monkeypatch.setattr(torch, "_cslt_compress", lambda w: w.clone(), raising=False)
    lin = torch.nn.Linear(64, 32, bias=True, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.masked_fill_(nm_mask(lin.weight.float().abs(), 2, 4), 0)
    layer = Sparse24Linear(lin, backend)
    keys = set(layer.state_dict())
    assert "packed" in keys and ("meta" in keys) == (backend == "cutlass-direct")
    assert layer.meta is None if backend == "cusparselt-direct" else layer.meta.shape[0] == 32


def test_known_faults_skip_cusparselt_fp16_on_sm90_only(monkeypatch):
    """A path that crashed the CUDA context on Hopper with fp16 is not tried there (and is, elsewhere)."""
    import torch

    from qingzhou.compress.prune.sparse24 import BACKENDS, known_faults

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    skipped = known_faults(cuda, torch.float16, list(BACKENDS))
    assert set(skipped) == {"cusparselt", "cusparselt-direct"} and all("illegal instruction" in v for v in skipped.values())
    assert known_faults(cuda, torch.bfloat16, list(BACKENDS)) == {}
    assert known_faults(torch.device("cpu"), torch.float16, list(BACKENDS)) == {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert known_faults(cuda, torch.float16, list(BACKENDS)) == {}
