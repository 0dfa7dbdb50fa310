"""`fit(..., gguf=True)`: model.gguf beside the GPTQ folder holds, for each linear, the llama.cpp type the
plan's bits map to (with llama.cpp's fallback for rows not a multiple of 256), quantised from the
original weights (read back close to them, not to the GPTQ codes)."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    from qingzhou.finetune.testing import tiny_model

    # 256-wide rows take k-quants; down_proj's 352-wide rows (a multiple of 32, not 256) fall back
    return tiny_model("llama", hidden_size=256, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)


def test_mapping_follows_bits_and_llama_cpp_fallback():
    from qingzhou.compress.fit.gguf import gguf_tensor_types
    from qingzhou.compress.fit.storage import KEEP, Option
    from qingzhou.errors import RecipeError

    model = _model()
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    want = {Option(8, 32): ("q8_0", "q8_0"), Option(4, 64): ("q4_k", "q5_0"), Option(3, 32): ("q3_k", "q4_0"),
            Option(2, 32): ("q2_k", "q4_0"), KEEP: ("f16", "f16")}
    for o, (t_q, t_down) in want.items():
        assert gguf_tensor_types(model, {q: o, down: o}) == {q: t_q, down: t_down}, o
    assert gguf_tensor_types(model, {q: KEEP}, keep="f32") == {q: "f32"}
    with pytest.raises(RecipeError, match="no GGUF type"):
        gguf_tensor_types(model, {q: Option(7, 32)})


def test_fit_writes_gguf_of_the_plan_from_the_original_weights(tmp_path):
    import gguf
    import torch

    from qingzhou.compress.fit.api import fit
    from qingzhou.compress.fit.storage import KEEP, option_space
    from qingzhou.compress.quantize.formats.gguf import _permute_rotary
    from qingzhou.compress.quantize.formats.kquants import BLOCK_QUANTIZERS, quantize_k
    from qingzhou.finetune.testing import byte_tokenizer

    model = _model()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n}
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(5, 272, (32,), generator=gen) for _ in range(4)]
    space = option_space((2, 3, 4, 8), (32,))
    report = fit(model, {"avg_bits": 4.6}, {"method": "rtn"}, calib, tokenizer=byte_tokenizer(),
                 output_dir=tmp_path / "out", neighbours=(), heldout=0, options=space + [KEEP], gguf=True)
    bits = {o.bits for o in report.choice.values() if not o.keep}
    assert len(bits) >= 2, report.mix()  # a mixed plan
    path = tmp_path / "out" / "model.gguf"
    assert (tmp_path / "out" / "model.safetensors").exists() and path.exists()
    assert report.gguf["bytes"] == path.stat().st_size != report.file_bytes
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # the temporary folder is gone

    mapping = {8: "Q8_0", 4: "Q4_K", 3: "Q3_K", 2: "Q2_K"}
    fallback = {"Q4_K": "Q5_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0", "Q8_0": "Q8_0", "F16": "F16"}
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    bound = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_0": 0.06, "Q4_K": 0.12, "Q4_0": 0.12, "Q3_K": 0.2, "Q2_K": 0.45,
             "F16": 1e-3}
    seen = set()
    for name, o in report.choice.items():
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        t = tensors[f"blk.{layer}.{names[rest]}.weight"]
        want = "F16" if o.keep else mapping[o.bits]
        if original[name].shape[1] % 256:
            want = fallback[want]
        got = gguf.GGMLQuantizationType(t.tensor_type).name
        assert got == want == report.gguf["linear_types"][name].upper(), (name, o)
        seen.add(got)
        w = original[name]
        if rest == "self_attn.q_proj":
            w = _permute_rotary(w, 4)
        elif rest == "self_attn.k_proj":
            w = _permute_rotary(w, 2)
        w = w.numpy()
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        rel = np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean())
        assert rel < bound[got], (name, got, rel)
        # exactly llama.cpp's format of the ORIGINAL weight (not of the applied plan's GPTQ weights)
        if got in BLOCK_QUANTIZERS:
            expected = quantize_k(w, got)
        else:
            expected = w.astype(np.float16) if got == "F16" else gguf.quants.quantize(w, gguf.GGMLQuantizationType[got])
        assert np.asarray(t.data).tobytes() == np.ascontiguousarray(expected).tobytes(), name
        if not o.keep:
            assert not torch.equal(model.get_submodule(name).dequantize_weight().detach(), original[name])
    assert len(seen) >= 3, (seen, report.mix())
    assert all(tensors[n].tensor_type == gguf.GGMLQuantizationType.F32 for n in tensors if "norm" in n)


def test_gguf_refused_before_measuring_for_unsupported_architecture(tmp_path):
    import torch

    from qingzhou.compress.fit.api import fit
    from qingzhou.errors import RecipeError
    from qingzhou.finetune.testing import tiny_model

    calib = [torch.randint(5, 272, (16,)) for _ in range(2)]
    with pytest.raises(RecipeError, match="GGUF export supports"):
        fit(tiny_model("gemma"), {"avg_bits": 4}, {"method": "rtn"}, calib, output_dir=tmp_path / "o", gguf=True)
    assert not (tmp_path / "o").exists()


def test_cli_fit_gguf_writes_model_gguf_beside_the_gptq_folder(tmp_path, tiny_llama_dir):
    import json

    import gguf
    from typer.testing import CliRunner

    from qingzhou.cli.main import app

    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["fit", str(tiny_llama_dir), str(out), "--avg-bits", "4", "--method", "rtn",
                                 "--num-samples", "4", "--seq-len", "32", "--device", "cpu", "--gguf",
                                 "--gguf-keep", "f32", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["gguf_bytes"] == (out / "model.gguf").stat().st_size and summary["gguf"] == str(out / "model.gguf")
    report = json.loads((out / "report.json").read_text())
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert types["token_embd.weight"] == "F32"  # the keep type; tiny rows (64) fall back from k-quants
    for name, t in report["gguf"]["linear_types"].items():
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        ll = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}[rest]
        assert types[f"blk.{layer}.{ll}.weight"] == t.upper()
        assert t in {"q8_0", "q5_0", "q4_0", "f32"}, t  # 64/128-wide rows: no k-quant fits
    r = CliRunner().invoke(app, ["fit", str(tiny_llama_dir), str(tmp_path / "o2"), "--avg-bits", "4", "--gguf",
                                 "--gguf-keep", "q4"])
    assert r.exit_code == 2 and "--gguf-keep" in r.output and not (tmp_path / "o2").exists()


def test_fit_stage_gguf_writes_model_gguf(tmp_path, tiny_llama_dir):
    import json

    import yaml

    from qingzhou.recipes.runner import run_recipe

    recipe = tmp_path / "fit.yaml"
    recipe.write_text(yaml.safe_dump({"name": "f", "stages": [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"},
        {"kind": "fit", "method": "rtn", "avg_bits": 4.2, "neighbours": [], "gguf": True},
    ]}, sort_keys=False))
    run_recipe(str(recipe), tmp_path / "run", progress=False)
    folder = tmp_path / "run" / "02-fit"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["gguf_bytes"] == (folder / "model" / "model.gguf").stat().st_size > 0
    assert (folder / "model" / "model.safetensors").exists()
