"""GGUF file types users pick (f16, bf16, Q4_K_M, Q5_K_M, Q6_K): llama.cpp's keys, llama-quantize's
per-tensor types, per-tensor overrides, and files transformers' GGUF loader reads back.

The type rules checked here are llama.cpp's (src/llama-quant.cpp, llama_tensor_get_type):
* use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division);
* Q4_K_M / Q5_K_M: attn_v of attn_v-layer i and ffn_down of layer i get Q6_K when use_more_bits;
* output.weight (or token_embd.weight when tied) gets Q6_K, or Q8_0 when its rows do not divide 256;
* rows not divisible by 256: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (then F16 below 32);
* norms and other 1-D tensors F32; f16/bf16 files: every 2-D weight F16/BF16.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from qingzhou.compress.quantize.formats.gguf import export_gguf
from qingzhou.compress.quantize.formats.gguf_mix import plan_types, use_more_bits
from qingzhou.errors import ModelLoadError
from qingzhou.finetune.testing import byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
T = gguf.GGMLQuantizationType
LAYER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _llama_shapes(n_layer, width, ffn, kv_width, vocab, tied):
    """(name, numpy shape) in the order export_gguf writes a Llama model."""
    out = [("token_embd.weight", (vocab, width))]
    rows = {"attn_q": (width, width), "attn_k": (kv_width, width), "attn_v": (kv_width, width),
            "attn_output": (width, width), "ffn_gate": (ffn, width), "ffn_up": (ffn, width), "ffn_down": (width, ffn)}
    for i in range(n_layer):
        out.append((f"blk.{i}.attn_norm.weight", (width,)))
        out += [(f"blk.{i}.{n}.weight", rows[n]) for n in LAYER[:4]]
        out.append((f"blk.{i}.ffn_norm.weight", (width,)))
        out += [(f"blk.{i}.{n}.weight", rows[n]) for n in LAYER[4:]]
    out.append(("output_norm.weight", (width,)))
    return out if tied else out + [("output.weight", (vocab, width))]


def test_use_more_bits_for_30_layers():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_q4_k_m_types_for_smollm2_shapes_follow_llama_quantize():
    # SmolLM2-135M: 30 layers, width 576 (not a multiple of 256), ffn 1536 (= 6 x 256), tied embeddings
    plan = plan_types(_llama_shapes(30, 576, 1536, 192, 49152, tied=True), "q4_k_m", n_layer=30, n_head=9, n_head_kv=3)
    more = {i for i in range(30) if use_more_bits(i, 30)}
    assert plan["token_embd.weight"] == T.Q8_0  # tied -> output rule; 576 % 256 -> Q8_0
    assert plan["output_norm.weight"] == T.F32
    for i in range(30):
        assert plan[f"blk.{i}.attn_norm.weight"] == plan[f"blk.{i}.ffn_norm.weight"] == T.F32
        assert plan[f"blk.{i}.attn_v.weight"] == (T.Q8_0 if i in more else T.Q5_0)  # Q6_K / Q4_K, fallen back
        assert plan[f"blk.{i}.ffn_down.weight"] == (T.Q6_K if i in more else T.Q4_K)  # 1536 divides 256
        for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert plan[f"blk.{i}.{n}.weight"] == T.Q5_0, n  # Q4_K -> Q5_0 (576 % 256)
    q5 = plan_types(_llama_shapes(30, 576, 1536, 192, 49152, tied=True), "q5_k_m", n_layer=30)
    assert q5["blk.3.attn_q.weight"] == T.Q5_1 and q5["blk.3.ffn_down.weight"] == T.Q5_K
    assert q5["blk.5.ffn_down.weight"] == T.Q6_K and q5["blk.5.attn_v.weight"] == T.Q8_0
    q6 = plan_types(_llama_shapes(30, 576, 1536, 192, 49152, tied=True), "q6_k", n_layer=30)
    assert q6["blk.3.attn_q.weight"] == T.Q8_0 and q6["blk.3.ffn_down.weight"] == T.Q6_K
    assert q6["token_embd.weight"] == T.Q8_0


def test_q4_k_m_types_for_a_2048_wide_untied_model():
    shapes = _llama_shapes(16, 2048, 8192, 512, 32000, tied=False)
    plan = plan_types(shapes, "q4_k_m", n_layer=16, n_head=32, n_head_kv=8)
    assert plan["output.weight"] == T.Q6_K and plan["token_embd.weight"] == T.Q4_K
    assert [i for i in range(16) if plan[f"blk.{i}.attn_v.weight"] == T.Q6_K] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(16) if plan[f"blk.{i}.ffn_down.weight"] == T.Q6_K] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert {plan[f"blk.3.{n}.weight"] for n in LAYER} == {T.Q4_K}
    f16 = plan_types(shapes, "f16", n_layer=16)
    assert {t for n, t in f16.items() if "norm" not in n} == {T.F16} and f16["output_norm.weight"] == T.F32


def test_q3_k_m_and_q2_k_types_follow_llama_quantize():
    shapes = _llama_shapes(32, 2048, 8192, 512, 32000, tied=False)  # n_head 32, n_head_kv 8: gqa 4
    q3 = plan_types(shapes, "q3_k_m", n_layer=32, n_head=32, n_head_kv=8)
    assert [q3[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2, 31)] == [T.Q5_K, T.Q5_K, T.Q4_K, T.Q4_K]
    assert [q3[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2, 31)] == [T.Q5_K, T.Q5_K, T.Q4_K, T.Q4_K]  # i < 32/16
    assert q3["blk.5.attn_output.weight"] == T.Q4_K and q3["blk.5.attn_q.weight"] == T.Q3_K
    assert q3["output.weight"] == T.Q6_K and q3["token_embd.weight"] == T.Q3_K
    q2 = plan_types(shapes, "q2_k", n_layer=32, n_head=32, n_head_kv=8)
    assert q2["blk.0.attn_v.weight"] == T.Q4_K  # gqa >= 4
    assert plan_types(shapes, "q2_k", n_layer=32, n_head=32, n_head_kv=16)["blk.0.attn_v.weight"] == T.Q3_K
    assert q2["blk.0.ffn_down.weight"] == q2["blk.0.attn_output.weight"] == T.Q3_K and q2["blk.0.ffn_up.weight"] == T.Q2_K
    smol = plan_types(_llama_shapes(30, 576, 1536, 192, 49152, tied=True), "q3_k_m", n_layer=30, n_head=9, n_head_kv=3)
    assert smol["blk.4.attn_q.weight"] == T.Q4_0 and smol["blk.4.attn_v.weight"] == T.Q5_0  # Q3_K -> Q4_0, Q4_K -> Q5_0


def test_overrides_replace_the_rule_and_skip_its_layer_count_like_llama_quantize():
    shapes = _llama_shapes(8, 256, 512, 256, 300, tied=False)
    base = plan_types(shapes, "q4_k_m", n_layer=8)
    assert [i for i in range(8) if base[f"blk.{i}.attn_v.weight"] == T.Q6_K] == [0, 3, 6, 7]
    over = plan_types(shapes, "q4_k_m", n_layer=8, overrides={"blk.0.attn_v.weight": "q8_0", "blk.2.ffn_up.weight": "q5_k"})
    assert over["blk.0.attn_v.weight"] == T.Q8_0 and over["blk.2.ffn_up.weight"] == T.Q5_K
    # blk.0's attn_v did not count, so blk.1 is attn_v number 0 of 8 for use_more_bits
    assert [i for i in range(1, 8) if over[f"blk.{i}.attn_v.weight"] == T.Q6_K] == [1, 4, 7]
    assert plan_types(shapes, "q4_k_m", n_layer=8, overrides={"blk.0.attn_q.weight": "q4_k"})["blk.0.attn_q.weight"] == T.Q4_K
    odd = plan_types(_llama_shapes(2, 96, 256, 96, 300, tied=True), "q4_k_m", n_layer=2,
                     overrides={"blk.0.ffn_down.weight": "q6_k", "blk.0.attn_q.weight": "q6_k"})
    assert odd["blk.0.ffn_down.weight"] == T.Q6_K and odd["blk.0.attn_q.weight"] == T.Q8_0  # 96 % 256 -> fallback


# --- files -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("qtype,ftype", [("f16", "MOSTLY_F16"), ("bf16", "MOSTLY_BF16"), ("q2_k", "MOSTLY_Q2_K"),
                                         ("q3_k_m", "MOSTLY_Q3_K_M"), ("q4_k_m", "MOSTLY_Q4_K_M"),
                                         ("q5_k_m", "MOSTLY_Q5_K_M"), ("q6_k", "MOSTLY_Q6_K")])
def test_new_types_have_llama_cpp_keys_and_the_planned_tensors(model, tmp_path, qtype, ftype):
    tok, cfg = byte_tokenizer(), model.config
    info = export_gguf(model, tok, tmp_path / "m.gguf", qtype)
    r, f = _fields(tmp_path / "m.gguf")
    expected = {
        "general.architecture": "llama", "general.file_type": int(gguf.LlamaFileType[ftype]), "general.alignment": 32,
        "llama.context_length": cfg.max_position_embeddings, "llama.embedding_length": 256, "llama.block_count": 8,
        "llama.feed_forward_length": 512, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 64, "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(cfg.rms_norm_eps),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": tok.bos_token_id,
        "tokenizer.ggml.eos_token_id": tok.eos_token_id, "tokenizer.chat_template": tok.chat_template,
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
    }
    assert {k: f.get(k) for k in expected} == expected
    assert f["tokenizer.ggml.pre"] and len(f["tokenizer.ggml.tokens"]) == len(f["tokenizer.ggml.token_type"]) >= cfg.vocab_size
    # byte_tokenizer has no merges and gguf writes no empty array, so its files carry scores instead (llama.cpp
    # needs merges for a gpt2 vocabulary: SmolLM2's are compared with the shipped file in test_interop_exports)
    assert len(f["tokenizer.ggml.scores"]) == len(f["tokenizer.ggml.tokens"])
    assert all(t.data_offset % 32 == 0 for t in r.tensors)
    got = {t.name: T(t.tensor_type).name for t in r.tensors}
    assert got == info["tensor_plan"]
    # each tensor reads back (gguf's dequantizer) close to the model weight it came from
    bound = {"f16": 1e-3, "bf16": 8e-3, "q2_k": 0.45, "q3_k_m": 0.12, "q4_k_m": 0.12, "q5_k_m": 0.06, "q6_k": 0.03}[qtype]
    weight = model.model.layers[2].mlp.down_proj.weight.detach().numpy()
    t = next(t for t in r.tensors if t.name == "blk.2.ffn_down.weight")
    back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weight.shape)
    assert np.sqrt(((back - weight) ** 2).mean() / (weight ** 2).mean()) < bound


def test_k_mixes_load_in_transformers_with_error_ordered_by_bits(model, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 261, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    err, size = {}, {}
    for q in ("q4_k_m", "q5_k_m", "q6_k", "f16"):
        info = export_gguf(model, byte_tokenizer(), tmp_path / f"{q}.gguf", q)
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"{q}.gguf", dtype=torch.float32).eval()
        with torch.no_grad():
            err[q] = float((loaded(ids).logits - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        size[q] = info["bytes"]
    assert err["f16"] < 0.005 and err["f16"] < err["q6_k"] < err["q5_k_m"] < err["q4_k_m"] < 0.3, err
    assert size["q4_k_m"] < size["q5_k_m"] < size["q6_k"] < 0.5 * size["f16"], size


def test_tensor_types_takes_hf_or_llama_cpp_names_and_refuses_unknown_ones(model, tmp_path):
    tok = byte_tokenizer()
    info = export_gguf(model, tok, tmp_path / "o.gguf", "q4_k_m",
                       tensor_types={"model.layers.1.mlp.down_proj": "q8_0", "blk.2.attn_q.weight": "Q6_K",
                                     "lm_head": "f16"})
    plan = info["tensor_plan"]
    assert (plan["blk.1.ffn_down.weight"], plan["blk.2.attn_q.weight"], plan["output.weight"]) == ("Q8_0", "Q6_K", "F16")
    assert plan["blk.3.attn_q.weight"] == "Q4_K"
    with pytest.raises(ModelLoadError, match="not a tensor of this model"):
        export_gguf(model, tok, tmp_path / "x.gguf", "q4_k_m", tensor_types={"model.layers.99.mlp.down_proj": "q8_0"})
    with pytest.raises(ModelLoadError, match="q3_x"):
        export_gguf(model, tok, tmp_path / "y.gguf", "q4_k_m", tensor_types={"blk.0.attn_q": "q3_x"})
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_cli_exports_k_mix_and_names_the_types_for_a_wrong_one(tmp_path, tiny_llama_dir):
    from typer.testing import CliRunner

    from qingzhou.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["quantize", str(tiny_llama_dir), str(tmp_path / "g"), "--method", "none",
                              "--gguf-type", "q4_k_m", "--json"])
    assert res.exit_code == 0, res.output
    f = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf")).fields
    assert f["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    res = runner.invoke(app, ["quantize", str(tiny_llama_dir), str(tmp_path / "h"), "--method", "none",
                              "--gguf-type", "q4_k_s"])
    assert res.exit_code == 2 and "q4_k_m" in res.output and "Traceback" not in res.output
