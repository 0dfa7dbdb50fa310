"""The GPTQ folder against what GPTQModel, transformers and vLLM require, and (where the GPTQModel
venv exists) loaded by GPTQModel and transformers themselves with our logits.

GPTQModel 7.7 does not install in CI time (an sdist built against torch, ~10 min on 2 cores, plus a
first-load kernel build of minutes), so the always-run tests check the fields and tensors those
loaders read, written out from their source:
* GPTQModel `TorchLinear` (the CPU kernel, `gptqmodel/nn_modules/qlinear/torch.py`): bits 2-8,
  group_size in [-1, 16, 32, ..., 1024] (checked on the *global* value before `dynamic` applies),
  formats gptq / gptq_v2, float16/bfloat16 compute; the loader (`models/loader.py`) refuses
  `sym: false` with format `gptq` unless GPTQModel wrote the file.
* vLLM `GPTQConfig.from_config`: bits, group_size, desc_act, lm_head, dynamic, checkpoint_format
  (`gptq_v2` switches its kernels to un-offset zero points); `GPTQLinearMethod.create_weights`:
  `qweight` int32 [in/pack, out], `g_idx` int32 [in], `qzeros` int32 [groups, out/pack], `scales`
  [groups, out], with group_size dividing the input width.
The peer test (`bench/peers/gptq_load.py` in /work/peers/gptqmodel, or $QZ_GPTQMODEL_PYTHON) runs
when that interpreter exists.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qingzhou.compress.quantize import load_quantized, quantize, save_quantized
from qingzhou.finetune.testing import byte_tokenizer, tiny_model
from qingzhou.llm.quantized.qlinear import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = Path(os.environ.get("QZ_GPTQMODEL_PYTHON", "/work/peers/gptqmodel/bin/python"))
GPTQMODEL_GROUP_SIZES = {-1, 16, 32, 64, 128, 256, 512, 1024}
VLLM_GPTQ_BITS = {2, 3, 4, 8}
IDS = torch.tensor([[3, 17, 99, 250, 42, 7, 7, 130, 11, 12, 13, 14, 15, 16, 17, 18]])
WIDE = {"hidden_size": 192, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}

CASES = {  # name: (model kwargs, quantize config)
    "sym": ({}, {"method": "rtn", "bits": 4, "group_size": 32, "sym": True}),
    "asym": ({}, {"method": "rtn", "bits": 4, "group_size": 32}),
    "act_order": ({}, {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "static_groups": False}),
    "fallback_48": ({}, {"method": "gptq", "bits": 4, "group_size": 48}),  # 64 % 48: every layer -> 32
    "mixed_groups": (WIDE, {"method": "rtn", "bits": 4, "group_size": 128}),  # 192 -> 64, down_proj 128
    "int8": ({}, {"method": "rtn", "bits": 8, "group_size": 32}),
    # other architecture families we export: Qwen2 (q/k/v biases), Gemma 3 (its own norms and scaling)
    "qwen2_asym": ({"arch": "qwen2"}, {"method": "gptq", "bits": 4, "group_size": 32}),
    "gemma3_sym": ({"arch": "gemma3_text"}, {"method": "rtn", "bits": 4, "group_size": 32, "sym": True}),
}


def _calib(n=4, length=32):
    return [torch.randint(0, 272, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _make(case, folder):
    kw, cfg = CASES[case]
    kw = dict(kw)
    m = tiny_model(kw.pop("arch", "llama"), **kw)
    quantize(m, cfg, _calib())
    save_quantized(m, byte_tokenizer(), folder)
    return m


def _group_size(qc, name):
    import re

    for pattern, o in (qc.get("dynamic") or {}).items():
        if pattern.startswith("+:") and re.match(pattern[2:], name):
            return o.get("group_size", qc["group_size"]), o.get("bits", qc["bits"])
    return qc["group_size"], qc["bits"]


@pytest.mark.parametrize("case", list(CASES))
def test_gptq_folder_has_what_gptqmodel_and_vllm_read(case, tmp_path):
    m = _make(case, tmp_path / "q")
    raw = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = raw["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] in VLLM_GPTQ_BITS
    assert qc["group_size"] in GPTQMODEL_GROUP_SIZES  # the global value, checked before `dynamic`
    assert isinstance(qc["desc_act"], bool) and isinstance(qc["sym"], bool) and qc["lm_head"] is False
    assert qc["checkpoint_format"] == ("gptq" if qc["sym"] else "gptq_v2")  # GPTQModel: no asym v1 from others
    assert qc["desc_act"] == CASES[case][1].get("act_order", CASES[case][1]["method"] == "gptq")
    assert raw["architectures"] == [type(m).__name__] and raw["dtype"] == "float16"
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    n = 0
    for name, layer in m.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        gs, bits = _group_size(qc, name)
        assert (gs, bits) == (layer.group_size, layer.bits) and gs in GPTQMODEL_GROUP_SIZES
        in_f, out_f = layer.in_features, layer.out_features
        groups = in_f // gs if gs > 0 else 1
        assert gs == -1 or in_f % gs == 0  # vLLM: the input width divides into whole groups
        shapes = {k: (sd[f"{name}.{k}"].dtype, tuple(sd[f"{name}.{k}"].shape)) for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert shapes == {"qweight": (torch.int32, (in_f * bits // 32, out_f)),
                          "qzeros": (torch.int32, (groups, out_f * bits // 32)),
                          "scales": (torch.float16, (groups, out_f)), "g_idx": (torch.int32, (in_f,))}
        n += 1
    assert n == 14
    floats = {k: v.dtype for k, v in sd.items() if v.is_floating_point()}
    assert set(floats.values()) == {torch.float16}  # embeddings/norms in 16 bits, like other GPTQ files
    with torch.no_grad():  # and still exactly the model in memory (quantize rounded those tensors)
        torch.testing.assert_close(load_quantized(tmp_path / "q")(IDS).logits, m(IDS).logits, rtol=0, atol=1e-5)


def test_16_bit_storage_shrinks_the_folder_and_reloads_in_bfloat16(tmp_path):
    """A model quantised in bfloat16 stores bfloat16 tensors; one quantised in fp32 stores float16,
    half the bytes of its embeddings."""
    m = tiny_model("llama")
    fp32_bytes = sum(p.numel() * 4 for n, p in m.named_parameters() if "layers" not in n)
    quantize(m, CASES["asym"][1], _calib())
    save_quantized(m, None, tmp_path / "a")
    sd = load_file(str(tmp_path / "a" / "model.safetensors"))
    stored = sum(v.numel() * v.element_size() for k, v in sd.items() if "layers" not in k)
    assert stored == fp32_bytes // 2
    b = tiny_model("llama").to(torch.bfloat16)
    quantize(b, CASES["asym"][1], _calib())
    save_quantized(b, None, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "b" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    again = load_quantized(tmp_path / "b", dtype=torch.bfloat16).state_dict()
    mine = b.state_dict()
    assert set(again) == set(mine)
    for k, v in mine.items():  # every tensor back bit for bit, in the dtype it had
        assert again[k].dtype == v.dtype and torch.equal(again[k], v), k


@pytest.mark.skipif(not PEER_PYTHON.exists(), reason=f"no GPTQModel venv at {PEER_PYTHON} (bench/peers/README.md)")
def test_gptqmodel_and_transformers_load_every_case_with_our_logits(tmp_path):
    """Each case loaded by GPTQModel (bfloat16: its CPU kernel's dtype) and by transformers' GPTQ
    integration (float32), in their own venv: logits within the rounding of the dtype they compute
    in, so each next token they pick is one whose logit is within that rounding of our best."""
    from qingzhou.llm.quantized.runtime import use_exact_runtime

    ours = {}
    for case in CASES:
        m = use_exact_runtime(_make(case, tmp_path / case))  # fp32 exact, not the CPU bf16 runtime
        with torch.no_grad():
            ours[case] = m(IDS).logits
    save_file({"ids": IDS}, str(tmp_path / "ids.safetensors"))
    cmd = [str(PEER_PYTHON), str(ROOT / "bench" / "peers" / "gptq_load.py"), "--inputs", str(tmp_path / "ids.safetensors"),
           "--out", str(tmp_path / "peer.safetensors"), "--threads", "1"]
    for case in CASES:
        cmd += ["--folder", f"{case}={tmp_path / case}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "peer.safetensors.json").read_text())
    theirs = load_file(str(tmp_path / "peer.safetensors"))
    for case, rows in info["cases"].items():
        for loader, row in rows.items():
            if case == "mixed_groups" and loader == "transformers":
                # transformers' GPTQ integration (optimum's GPTQQuantizer) ignores `dynamic`: a
                # per-module group size (bits, skip) loads in GPTQModel and vLLM, not there
                assert not row["ok"] and "must be divisible by `group_size: 128`" in row["error"], row
                continue
            assert row["ok"], (case, loader, row.get("error"))
            logits = theirs[f"{case}.{loader}.logits"]
            ref = ours[case]
            tol = (2e-2 if row["dtype"] == "bfloat16" else 1e-3) * float(ref.abs().max())
            assert float((logits - ref).abs().max()) <= tol, (case, loader)
            picked = ref.gather(-1, logits.argmax(-1, keepdim=True))[..., 0]
            assert bool((picked >= ref.amax(-1) - 2 * tol).all()), (case, loader)
            assert float((logits.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9, (case, loader)
