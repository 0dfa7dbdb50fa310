"""compressed-tensors export: read back by the `compressed-tensors` package itself (its compressors,
and transformers' loader built on it), and checked against what vLLM's compressed-tensors loader
requires of config.json and the tensors.

vLLM does not run here (no GPU); its requirements are written out below from its loader
(`vllm/model_executor/layers/quantization/compressed_tensors/`: `CompressedTensorsConfig.from_config`
reads quant_method/format/config_groups/ignore/sparsity_config; the WNA16 scheme takes 4/8-bit
pack-quantized group/channel weights as `weight_packed` [out, in*bits/32] int32, `weight_scale`
[out, groups], `weight_shape` [2], and `weight_zero_point` [out*bits/32, groups] int32 when
asymmetric; the W8A8 int8 scheme takes `weight` int8 [out, in] and `weight_scale` [out, 1] with
per-token dynamic symmetric int8 input activations).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qingzhou.compress.prune import prune
from qingzhou.compress.quantize import quantize
from qingzhou.compress.quantize.api import save_compressed
from qingzhou.errors import ModelLoadError
from qingzhou.finetune.testing import byte_tokenizer, tiny_model
from qingzhou.llm.quantized.qlinear import QuantLinear

ct = pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[3, 17, 99, 250, 42, 7, 7, 130]])
VLLM_WNA16_BITS = {4, 8}


def _calib(n=4, length=32):
    return [torch.randint(0, 272, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _export(model, tmp_path, name="ct"):
    save_compressed(model, byte_tokenizer(), tmp_path / name, "compressed-tensors")
    folder = tmp_path / name
    return folder, json.loads((folder / "config.json").read_text())["quantization_config"], \
        load_file(str(folder / "model.safetensors"))


def _scheme(qc, module_name):
    """The config group covering `module_name`, parsed by compressed-tensors' own pydantic model."""
    import re

    from compressed_tensors.quantization import QuantizationScheme

    found = []
    for group in qc["config_groups"].values():
        for t in group["targets"]:
            if t == "Linear" and module_name not in qc["ignore"] or t.startswith("re:") and re.match(t[3:], module_name):
                found.append(group)
    assert len(found) == 1, (module_name, found)  # no module in two groups (vLLM raises on that too)
    return QuantizationScheme.model_validate(found[0])


def _check_vllm_config(qc, model):
    """What vLLM's `CompressedTensorsConfig.from_config` and scheme selection read."""
    from compressed_tensors.config import CompressionFormat

    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] in {f.value for f in CompressionFormat}
    assert "lm_head" in qc["ignore"]
    linears = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantLinear))
               or type(m).__name__ == "W8A8Linear"]
    covered = [n for n in linears if n not in qc["ignore"]]
    for n in covered:
        _scheme(qc, n)  # exactly one group each
    assert isinstance(qc["sparsity_config"], dict) and isinstance(qc["config_groups"], dict)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (4, 32, True), (8, -1, True), (4, -1, False)])
def test_pack_quantized_decompresses_to_our_weights_exactly(bits, group_size, sym, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    m = tiny_model("llama")
    quantize(m, {"method": "rtn", "bits": bits, "group_size": group_size, "sym": sym}, _calib())
    folder, qc, sd = _export(m, tmp_path)
    assert qc["format"] == "pack-quantized" and len(qc["config_groups"]) == 1
    _check_vllm_config(qc, m)
    n_checked = 0
    for name, layer in m.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        scheme = _scheme(qc, name)
        w = scheme.weights
        assert (w.num_bits, w.symmetric, str(getattr(w.strategy, "value", w.strategy))) == (bits, sym, "group" if group_size > 0 else "channel")
        assert w.num_bits in VLLM_WNA16_BITS
        out_f, in_f = layer.out_features, layer.in_features
        groups = in_f // group_size if group_size > 0 else 1
        state = {k.removeprefix(name + "."): v for k, v in sd.items() if k.startswith(name + ".")}
        assert state["weight_packed"].dtype == torch.int32 and state["weight_packed"].shape == (out_f, in_f * bits // 32)
        assert state["weight_scale"].shape == (out_f, groups) and state["weight_scale"].dtype == torch.float16
        assert state["weight_shape"].tolist() == [out_f, in_f]
        assert ("weight_zero_point" in state) == (not sym)
        # the package's own packer gives the same words from the signed codes and zero points
        from qingzhou.llm.quantized.pack import unpack_qweight, unpack_qzeros

        codes = unpack_qweight(layer.qweight, bits, in_f) - 2 ** (bits - 1)
        assert torch.equal(pack_to_int32(codes.to(torch.int8), bits), state["weight_packed"])
        if not sym:
            zeros = unpack_qzeros(layer.qzeros, bits, out_f).T - 2 ** (bits - 1)  # [out, groups]
            assert torch.equal(pack_to_int32(zeros.to(torch.int8).contiguous(), bits, packed_dim=0),
                               state["weight_zero_point"])
            assert state["weight_zero_point"].shape == (out_f * bits // 32, groups)
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(weight, layer.dequantize_weight().to(weight.dtype)), name
        n_checked += 1
    assert n_checked == 14
    assert set(sd) >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert sd["model.embed_tokens.weight"].dtype == torch.float16  # 16-bit like llm-compressor's files


@pytest.mark.parametrize("arch,bits,group_size", [("llama", 4, 32), ("llama", 8, -1), ("qwen2", 4, 32),
                                                   ("gemma3_text", 4, 32)])
def test_transformers_loads_symmetric_pack_quantized_with_our_logits(arch, bits, group_size, tmp_path):
    """transformers' compressed-tensors integration (decompressing on load) computes what we do.
    Asymmetric files are decompressed exactly above; transformers + compressed-tensors 0.20.1 cannot
    load them (its meta-device pass leaves `weight_zero_point` unpacked, then the packed tensor that
    its own compressor writes mismatches), which holds for llm-compressor's files too."""
    from transformers import AutoModelForCausalLM

    m = tiny_model(arch)
    quantize(m, {"method": "rtn", "bits": bits, "group_size": group_size, "sym": True}, _calib())
    folder, qc, _ = _export(m, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    from qingzhou.llm.quantized.runtime import use_exact_runtime

    use_exact_runtime(m)  # fp32 exact, as transformers computes, not the CPU bf16 runtime
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, m(IDS).logits, rtol=0, atol=1e-5)


def test_w8a8_int_quantized_has_vllm_fields_and_decompresses_exactly(tmp_path):
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from transformers import AutoModelForCausalLM

    m = tiny_model("llama")
    quantize(m, {"method": "smoothquant"}, _calib())
    folder, qc, sd = _export(m, tmp_path)
    assert qc["format"] == "int-quantized"
    _check_vllm_config(qc, m)
    layers = {n: mod for n, mod in m.named_modules() if type(mod).__name__ == "W8A8Linear"}
    assert len(layers) == 14
    for name, layer in layers.items():
        scheme = _scheme(qc, name)
        w, a = scheme.weights, scheme.input_activations
        assert (w.num_bits, w.symmetric, str(getattr(w.strategy, "value", w.strategy)), w.dynamic) == (8, True, "channel", False)
        assert (a.num_bits, a.symmetric, str(getattr(a.strategy, "value", a.strategy)), a.dynamic) == (8, True, "token", True)
        q, s = sd[f"{name}.weight"], sd[f"{name}.weight_scale"]
        assert q.dtype == torch.int8 and q.shape == (layer.out_features, layer.in_features)
        assert s.shape == (layer.out_features, 1)
        weight = NaiveQuantizationCompressor.decompress({"weight": q, "weight_scale": s}, scheme)["weight"]
        assert torch.equal(weight.float(), layer.weight.float()), name
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    # Weights only: compressed-tensors' simulation of the dynamic activations uses the scale
    # amax/127.5 (its symmetric range is 255 wide), vLLM's int8 kernel and qingzhou amax/127.
    for mod in hf.modules():
        if hasattr(mod, "quantization_scheme"):
            mod.quantization_enabled = False
    for layer in layers.values():
        layer.quantize_activations = False
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, m(IDS).logits, rtol=0, atol=1e-5)


def test_24_sparse_model_writes_sparsity_config_and_loads(tmp_path):
    from compressed_tensors.config import SparsityCompressionConfig
    from transformers import AutoModelForCausalLM

    m = tiny_model("llama")
    prune(m, {"method": "magnitude", "nm": "2:4"})
    folder, qc, sd = _export(m, tmp_path)
    sc = qc["sparsity_config"]
    assert sc["format"] == "dense" and sc["sparsity_structure"] == "2:4" and "lm_head" in sc["ignore"]
    assert sc["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    parsed = SparsityCompressionConfig.load_from_registry(sc["format"], **sc)
    assert parsed.sparsity_structure == "2:4"
    assert qc["config_groups"] == {}
    w = sd["model.layers.0.mlp.up_proj.weight"]
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for name, p in hf.named_parameters():  # the weights are ours, stored in 16 bits
        ref = m.get_parameter(name) if name != "lm_head.weight" else m.lm_head.weight
        assert torch.equal(p, ref.detach().half().float()), name


def test_act_order_without_static_groups_and_dense_models_are_refused(tmp_path):
    m = tiny_model("llama")
    quantize(m, {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "static_groups": False}, _calib())
    with pytest.raises(ModelLoadError, match="static_groups"):
        save_compressed(m, None, tmp_path / "a", "compressed-tensors")
    with pytest.raises(ModelLoadError, match="nothing to write"):
        save_compressed(tiny_model("llama"), None, tmp_path / "b", "compressed-tensors")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_mixed_schemes_target_exact_names(tmp_path):
    """Per-module overrides become one config group per scheme with exact-name targets."""
    m = tiny_model("llama")
    quantize(m, {"method": "rtn", "bits": 4, "group_size": 32,
                 "overrides": [{"pattern": r"mlp\.down_proj", "bits": 8, "group_size": 64}]}, _calib())
    folder, qc, sd = _export(m, tmp_path)
    assert len(qc["config_groups"]) == 2
    _check_vllm_config(qc, m)
    assert _scheme(qc, "model.layers.1.mlp.down_proj").weights.num_bits == 8
    assert _scheme(qc, "model.layers.1.mlp.up_proj").weights.num_bits == 4


def test_cli_quantize_writes_compressed_tensors(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from qingzhou.cli.main import app

    res = CliRunner().invoke(app, ["quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--method", "rtn",
                                   "--group-size", "32", "--sym", "--compressed-tensors"])
    assert res.exit_code == 0, res.output
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert (tmp_path / "q" / "metrics.json").is_file()
