"""GGUF export: files qingzhou writes load in transformers (and load_model) with matching logits."""
from __future__ import annotations

import pytest
import torch

from qingzhou.compress.quantize import quantize
from qingzhou.compress.quantize.formats.gguf import export_gguf
from qingzhou.errors import ModelLoadError
from qingzhou.finetune.testing import byte_tokenizer, tiny_model

torch.set_num_threads(1)


def _ids(vocab=261):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _rel(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def source():
    return tiny_model("llama", tie_word_embeddings=False), byte_tokenizer()


def test_f32_round_trip_is_exact_so_the_rotary_permutation_is_right(source, tmp_path):
    m, tok = source
    info = export_gguf(m, tok, tmp_path / "m.gguf", "f32")
    assert info["tensor_types"] == {"F32": 21}
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "m.gguf")(ids).logits, m(ids).logits, atol=1e-5, rtol=1e-5)


def test_q8_0_tight_q4_0_looser_and_load_model(source, tmp_path):
    from qingzhou.llm import load_model

    m, tok = source
    ids = _ids()
    with torch.no_grad():
        ref = m(ids).logits
    errs = {}
    for q in ("q8_0", "q4_0"):
        info = export_gguf(m, tok, tmp_path / f"m_{q}.gguf", q)
        assert info["tensor_types"].get(q.upper(), 0) == (16 if q == "q8_0" else 14)
        with torch.no_grad():
            errs[q] = _rel(_load(tmp_path / f"m_{q}.gguf")(ids).logits, ref)
    assert errs["q8_0"] < 0.02 and errs["q8_0"] < errs["q4_0"] < 0.25, errs
    sizes = {q: (tmp_path / f"m_{q}.gguf").stat().st_size for q in errs}
    assert sizes["q4_0"] < 0.8 * sizes["q8_0"]
    loaded, ltok = load_model(str(tmp_path / "m_q8_0.gguf"), dtype="float32", device="cpu")
    text = "hello <|im_end|> wörld"
    assert ltok(text)["input_ids"] == tok(text)["input_ids"]
    assert ltok.chat_template == tok.chat_template
    import gguf

    fields = gguf.GGUFReader(str(tmp_path / "m_q8_0.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # byte-level GPT-2 split
    assert fields["llama.attention.head_count_kv"].contents() == 2
    with torch.no_grad():
        assert _rel(loaded(ids).logits, ref) == pytest.approx(errs["q8_0"], rel=1e-3)


def test_bpe_tokenizer_with_merges_and_tied_embeddings(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["hello world"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert len(tok) > 258  # merges were learnt
    m = tiny_model("llama", vocab_size=320, tie_word_embeddings=True)
    info = export_gguf(m, tok, tmp_path / "t.gguf", "f32")
    assert info["tensor_types"] == {"F32": 20}  # no separate output.weight
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    text = "the lazy fox says hello world"
    assert back(text, add_special_tokens=False)["input_ids"] == tok(text)["input_ids"]
    ids = _ids(300)
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "t.gguf")(ids).logits, m(ids).logits, atol=1e-5, rtol=1e-5)


def test_quantised_model_exports_its_dequantised_weights(tmp_path):
    m = tiny_model("llama")
    calib = [torch.randint(0, 261, (32,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    quantize(m, {"method": "rtn", "bits": 4, "group_size": 32}, calib)
    export_gguf(m, byte_tokenizer(), tmp_path / "q.gguf", "f32")
    ids = _ids()
    from qingzhou.llm.quantized.runtime import use_exact_runtime

    use_exact_runtime(m)  # fp32 exact, as the f32 file computes (not the CPU bf16 runtime)
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "q.gguf")(ids).logits, m(ids).logits, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    with pytest.raises(ModelLoadError, match="llama, mistral, qwen2, gemma3_text"):
        export_gguf(tiny_model("gpt2"), byte_tokenizer(), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def _gemma3(**kw):
    """A tiny Gemma 3 with random norm weights (they init to 0, which would hide the 1 + w shift),
    a head size other than hidden / heads, and five sliding layers then a global one."""
    m = tiny_model("gemma3_text", head_dim=32, sliding_window=8, num_hidden_layers=6,  # llama.cpp's pattern:
                   layer_types=["sliding_attention"] * 5 + ["full_attention"], **kw)  # every 6th layer global
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return m


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_f32_round_trip_of_other_architectures(arch, tmp_path):
    """Qwen2 (q/k/v biases, NEOX rope: no permutation) and Gemma 3 (norms stored as 1 + w, extra
    norms, head_dim 32 != 64 / 4, sliding window) come back from the file with the same logits."""
    import gguf

    m = _gemma3() if arch == "gemma3_text" else tiny_model("qwen2")
    if arch == "qwen2":
        assert m.model.layers[0].self_attn.q_proj.bias is not None
        with torch.no_grad():
            for layer in m.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    info = export_gguf(m, byte_tokenizer(), tmp_path / "m.gguf", "f32")
    ids = _ids(261)[:, :20]  # longer than gemma's 8-token window
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "m.gguf")(ids).logits, m(ids).logits, atol=1e-4, rtol=1e-4)
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    name = {"qwen2": "qwen2", "gemma3_text": "gemma3"}[arch]
    assert fields["general.architecture"].contents() == name
    if arch == "gemma3_text":
        assert fields["gemma3.attention.sliding_window"].contents() == 8
        assert fields["gemma3.attention.key_length"].contents() == 32
        assert info["tensor_types"] == {"F32": 1 + 6 * 13 + 2}  # embedding, 13 per layer, final norm, head
        with pytest.raises(ModelLoadError, match="fixed gemma3 pattern"):
            export_gguf(tiny_model("gemma3_text", num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]),
                        byte_tokenizer(), tmp_path / "x.gguf", "f32")
    else:
        assert info["tensor_types"] == {"F32": 1 + 2 * 12 + 2}  # 9 weights + 3 biases per layer


def test_sentencepiece_tokenizer_is_written_as_llama_spm(tmp_path):
    """A SentencePiece-style BPE (byte fallback, Gemma/Llama 2) becomes llama.cpp's `llama`
    tokenizer: scores in vocabulary order, byte pieces BYTE, specials CONTROL, and transformers
    reads it back into a tokenizer that splits text the same way."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    words = ["▁", "t", "h", "e", "▁t", "he", "▁the", "c", "a", "▁c", "at", "▁cat", "s", "▁s", "▁sat"]
    vocab = {p: i for i, p in enumerate(pieces + words)}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "t"), ("▁c", "at"), ("▁", "s"), ("▁s", "at")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>"]})
    m = _gemma3(vocab_size=len(tok))
    export_gguf(m, tok, tmp_path / "t.gguf", "f32")
    fields = gguf.GGUFReader(str(tmp_path / "t.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    assert types[vocab["<0x41>"]] == 6 and types[vocab["<bos>"]] == 3 and types[vocab["<unk>"]] == 2
    assert types[len(tok) - 1] == 3 and types[vocab["▁cat"]] == 1
    normal = [i for i, t in enumerate(types) if t == 1]
    assert all(scores[a] > scores[b] for a, b in zip(normal, normal[1:]))  # earlier piece, higher priority
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    text = "the cat sat é"  # é falls back to bytes
    assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_quantize_stage_exports_gguf_and_continues_from_the_file(tmp_path, tiny_llama_dir):
    import yaml

    from qingzhou.recipes.runner import run_recipe

    text = tmp_path / "t.txt"
    text.write_text("Banks hold capital against credit, market and operational risk. " * 12)
    ppl = {"data": str(text), "seq_len": 32}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "stages": [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"},
        {"kind": "eval", "perplexity": ppl},
        {"kind": "quantize", "method": "none", "save_format": "gguf", "gguf_type": "q8_0"},
        {"kind": "eval", "perplexity": ppl},
    ]}, sort_keys=False))
    run = run_recipe(str(path), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "03-quantize" / "model" / "model.gguf").exists()
    assert run.stages[2]["metrics"]["gguf_type"] == "q8_0"
    before, after = (run.stages[i]["metrics"]["perplexity"]["ppl"] for i in (1, 3))
    assert after == pytest.approx(before, rel=0.01) and after != before


def test_method_none_needs_gguf():
    from qingzhou.recipes.stages.quantize import QuantizeStage

    with pytest.raises(ValueError, match="save_format: gguf"):
        QuantizeStage.model_validate({"kind": "quantize", "method": "none"})


def test_cli_writes_gguf_and_awq_folder(tmp_path, tiny_llama_dir):
    import json

    from typer.testing import CliRunner

    from qingzhou.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["quantize", str(tiny_llama_dir), str(tmp_path / "g"), "--method", "none",
                              "--gguf-type", "q4_0", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["gguf_type"] == "q4_0"
    assert (tmp_path / "g" / "model.gguf").stat().st_size > 0
    calib = tmp_path / "c.txt"
    calib.write_text("Banks hold capital against credit, market and operational risk. " * 40)
    res = runner.invoke(app, ["quantize", str(tiny_llama_dir), str(tmp_path / "a"), "--method", "awq",
                              "--bits", "4", "--group-size", "32", "--calibration", str(calib),
                              "--num-samples", "4", "--seq-len", "32", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["meta"]["method"] == "awq"
