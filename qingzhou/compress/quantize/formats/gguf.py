"""Export a Llama, Mistral, Qwen2 or Gemma 3 model to a llama.cpp GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q2_K,
Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, or a per-tensor mix).

What llama.cpp and transformers' GGUF loader need, and why each detail matters:
* llama.cpp tensor names (`token_embd`, `blk.N.attn_q`, ...; `GGUFArch` per architecture). For
  Llama/Mistral q/k weights are stored in llama.cpp's rotary layout: `convert_hf_to_gguf.py`
  permutes their rows per head (HF keeps the two rotary halves apart, llama.cpp interleaves them)
  and transformers' loader undoes that permutation, so we apply the same permutation here or every
  attention score would be wrong after loading (Qwen2 and Gemma rotate NEOX-style: no permutation).
  Gemma's RMSNorms scale by 1 + w; llama.cpp's gemma3 reads 1 + w, so norms are written shifted;
* `<arch>.*` hyper-parameters (context, width, heads, kv heads, rms eps, rope base/dims, vocab;
  Gemma 3's head size and sliding window);
* the tokenizer as `tokenizer.ggml.*`, read from the fast tokenizer's own JSON so nothing is
  re-derived: byte-level BPE (SmolLM2, Llama 3, Qwen2) as `gpt2` (tokens, types - special added
  tokens as CONTROL -, merges) with `tokenizer.ggml.pre`, llama.cpp's name for the pre-tokenizer,
  found as its converter finds it (see `gguf_pre`); SentencePiece BPE with byte fallback (Gemma,
  Llama 2) as `llama` (tokens, scores in vocabulary order, which is SentencePiece's merge priority,
  BYTE/CONTROL/USER types); special ids and the chat template either way;
* the type of each tensor: `gguf_mix.plan_types`, llama-quantize's own rules (a Q4_K_M file gives
  some attn_v/ffn_down layers and the output head Q6_K, and rows that are not a multiple of 256
  fall back to Q5_0/Q5_1/Q8_0), plus per-tensor overrides (`tensor_types`); norms stay F32.

The quantisation is byte-compatible with llama.cpp's tools: `gguf.quants.quantize` (the reference
numpy port of ggml's kernels) for F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, and `kquants` (our port of
ggml's k-quant scale searches) for Q2_K..Q6_K, which the gguf package cannot write. An f16 or
bf16 file is the input llama.cpp's `llama-quantize` takes to make any of its other types.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from qingzhou.compress.quantize.formats.gguf_mix import FILE_TYPES, TENSOR_TYPES, plan_types
from qingzhou.compress.quantize.formats.gguf_pre import llama_cpp_pre
from qingzhou.compress.quantize.formats.kquants import BLOCK_QUANTIZERS, quantize_k
from qingzhou.errors import ModelLoadError
from qingzhou.io import set_default_mode

GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"]

_LLAMA_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers architecture maps onto a llama.cpp one (`convert_hf_to_gguf.py`'s
    model class for it): tensor names, the row order of q/k, norm storage, biases, extra keys."""

    name: str  # general.architecture
    layer: dict[str, str]  # HF submodule of a decoder layer -> llama.cpp tensor stem
    permute_qk: bool = True  # Llama's rotary halves -> llama.cpp's interleaved rows; NEOX-rope archs keep HF's
    norm_shift: float = 0.0  # Gemma computes x * (1 + w) and stores w; llama.cpp reads 1 + w
    biases: tuple[str, ...] = ()  # submodules whose bias is a tensor of the arch (Qwen2's q/k/v)
    sliding_window: bool = False  # writes `<arch>.attention.sliding_window`
    always_head_dims: bool = False  # writes key/value_length even when head_dim = hidden / heads


_LLAMA = GGUFArch("llama", _LLAMA_LAYER)
_QWEN2 = GGUFArch("qwen2", _LLAMA_LAYER, permute_qk=False,
                  biases=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
_GEMMA3 = GGUFArch("gemma3", {**_LLAMA_LAYER, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                              "post_attention_layernorm": "post_attention_norm",
                              "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"},
                   permute_qk=False, norm_shift=1.0, sliding_window=True, always_head_dims=True)
ARCHS: dict[str, GGUFArch] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _QWEN2, "gemma3_text": _GEMMA3}
SUPPORTED = tuple(ARCHS)  # transformers model_type values the export takes
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def export_gguf(model: nn.Module, tokenizer: Any, path: str | Path, qtype: GGUFType = "q8_0",
                *, pre: str | None = None, tensor_types: Mapping[str, str] | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Write `model` (dense, or with qingzhou `QuantLinear` layers, dequantised) to `path`.

    `pre` is llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`, e.g. "smollm", "llama-bpe",
    "qwen2"): it picks the regex llama.cpp splits text with before BPE and how it detokenises.
    By default it is the name in the GGUF the model was loaded from, else the one llama.cpp's
    converter would write (`gguf_pre.llama_cpp_pre`); pass it to override.
    `tensor_types` maps tensors to GGML types (`gguf_mix.TENSOR_TYPES` keys: "q4_k", "q6_k",
    "q8_0", "f16", ...) over the file type's rule, e.g. a mixed-bit plan; keys are llama.cpp names
    (`blk.3.ffn_down.weight`) or HF module names (`model.layers.3.mlp.down_proj`), `.weight`
    optional. `general.file_type` stays `qtype`'s.
    Returns a small summary (path, bytes, tensor types, pre-tokenizer and where that name came
    from). The file gets normal permissions (0666 less the umask). Raises `ModelLoadError` for architectures
    other than Llama/Mistral/Qwen2/Gemma 3, naming the supported ones. An existing file at `path` is replaced
    only with `overwrite=True`.
    """
    import gguf

    cfg = model.config
    if cfg.model_type not in ARCHS:
        raise ModelLoadError(f"GGUF export supports {', '.join(SUPPORTED)} models, not {cfg.model_type!r}.",
                             where="export_gguf", hint="Save in the GPTQ layout (save_format: gguf -> gptq).")
    arch = ARCHS[cfg.model_type]
    if arch.sliding_window:
        _check_swa_pattern(cfg)
    if qtype not in FILE_TYPES:
        raise ModelLoadError(f"unknown GGUF type {qtype!r}.", where="gguf_type", hint=f"Use one of {', '.join(FILE_TYPES)}.")
    rope = _rope(cfg)
    path = Path(path)
    if path.exists() and not (overwrite and path.is_file()):
        from qingzhou.io import OutputError

        raise OutputError("the output file exists." if path.is_file() else "the output path is a folder.", where=str(path),
                          hint="Choose another path" + (", or pass overwrite=True (--force) to replace it." if path.is_file() else "."))
    spec = _tokenizer_spec(tokenizer)  # parsed once: a 262k-entry vocabulary is tens of MB of JSON
    spm = _is_spm(spec)
    pre, pre_source = (pre, "argument") if pre else (("default", "sentencepiece") if spm else llama_cpp_pre(tokenizer))
    plan = _plan(model, qtype, tensor_types)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    types: dict[str, int] = {}
    try:
        w = gguf.GGUFWriter(tmp, arch.name)
        _write_hparams(w, cfg, rope, qtype, arch)
        (_write_spm_tokenizer if spm else _write_tokenizer)(w, spec, tokenizer, cfg.vocab_size, pre)
        for name, _, tensor in _arch_tensors(model):
            t = plan[name]
            types[t.name] = types.get(t.name, 0) + 1
            data = tensor.detach().float().cpu().numpy()
            if t == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, data.astype(np.float32))
            elif t == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, data.astype(np.float16))
            elif t.name in BLOCK_QUANTIZERS:
                w.add_tensor(name, quantize_k(data, t.name), raw_dtype=t)
            else:
                w.add_tensor(name, gguf.quants.quantize(data, t), raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        set_default_mode(tmp)  # mkstemp made it 0600; serving tools run as other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return {"path": str(path), "bytes": path.stat().st_size, "gguf_type": qtype, "tensor_types": types,
            "tensor_plan": {n: t.name for n, t in plan.items()}, "pre_tokenizer": pre, "pre_tokenizer_from": pre_source}


def _plan(model: nn.Module, qtype: str, tensor_types: Mapping[str, str] | None) -> dict[str, Any]:
    """GGML type per llama.cpp tensor name: `gguf_mix.plan_types` with the overrides resolved."""
    cfg = model.config
    shapes, aliases = [], {}
    for name, hf, tensor in _arch_tensors(model):
        shapes.append((name, tuple(tensor.shape)))
        for key in (name, name.removesuffix(".weight"), hf, hf.removesuffix(".weight")):
            aliases[key] = name
    overrides: dict[str, str] = {}
    for key, value in (tensor_types or {}).items():
        if key not in aliases:
            raise ModelLoadError(f"tensor_types names {key!r}, which is not a tensor of this model.",
                                 where="export_gguf tensor_types",
                                 hint="Use llama.cpp names (blk.0.ffn_down.weight) or HF module names "
                                      "(model.layers.0.mlp.down_proj).")
        if str(value).lower() not in TENSOR_TYPES:
            raise ModelLoadError(f"tensor_types gives {key!r} the type {value!r}.", where="export_gguf tensor_types",
                                 hint=f"Use one of {', '.join(TENSOR_TYPES)}.")
        overrides[aliases[key]] = str(value).lower()
    n_head = int(cfg.num_attention_heads)
    return plan_types(shapes, qtype, n_layer=int(cfg.num_hidden_layers), n_head=n_head,
                      n_head_kv=int(getattr(cfg, "num_key_value_heads", None) or n_head), overrides=overrides)


def _rope(cfg: Any) -> dict[str, Any]:
    """The rope base llama.cpp needs. Gemma 3 keeps one set of parameters per attention kind: the
    global layers' base is `rope.freq_base`; llama.cpp fixes the sliding layers' at 10000."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if "full_attention" in params:
        local = dict(params.get("sliding_attention") or {})
        if local and (local.get("rope_type", "default") != "default" or float(local.get("rope_theta", 1e4)) != 1e4):
            raise ModelLoadError(f"sliding-window rope {local} is not what llama.cpp's gemma3 assumes "
                                 "(default rope, base 10000).", where="export_gguf")
        params = dict(params["full_attention"] or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type", "default")
    if kind not in ("default", None):
        raise ModelLoadError(f"rope_type {kind!r} is not exported to GGUF yet.", where="export_gguf",
                             hint="Only default RoPE is supported.")
    return {"theta": float(theta)}


SWA_PATTERN = 6  # llama.cpp's gemma3 makes every 6th layer global and the others sliding; the file cannot say otherwise


def _check_swa_pattern(cfg: Any) -> None:
    kinds = list(getattr(cfg, "layer_types", None) or [])
    expected = ["full_attention" if (i + 1) % SWA_PATTERN == 0 else "sliding_attention"
                for i in range(int(cfg.num_hidden_layers))]
    if kinds and kinds != expected:
        raise ModelLoadError(f"layer_types {kinds} differ from llama.cpp's fixed gemma3 pattern (every "
                             f"{SWA_PATTERN}th layer global).", where="export_gguf",
                             hint="Such a model cannot be written as gemma3 GGUF; save it in the GPTQ layout.")


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _write_hparams(w: Any, cfg: Any, rope: dict[str, Any], qtype: str, arch: GGUFArch = _LLAMA) -> None:
    import gguf

    ftype = FILE_TYPES[qtype].file_type
    name = getattr(cfg, "_name_or_path", "") or "qingzhou-model"
    w.add_name(Path(str(name)).name or "qingzhou-model")
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(rope["theta"])
    w.add_rope_dimension_count(_head_dim(cfg))
    if arch.always_head_dims or _head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(_head_dim(cfg))
        w.add_value_length(_head_dim(cfg))
    if arch.sliding_window:
        w.add_sliding_window(int(cfg.sliding_window))
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_custom_alignment(gguf.GGUF_DEFAULT_ALIGNMENT)  # llama.cpp's default, stated rather than implied


def _tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's own JSON (tokenizer.json), which both tokenizer writers read."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError("GGUF export needs a fast (tokenizers) tokenizer.", where="export_gguf")
    return json.loads(backend.to_str())


def _write_tokenizer(w: Any, spec: dict[str, Any], tokenizer: Any, vocab_size: int, pre: str) -> None:
    """BPE vocabulary, merges and special ids from a fast tokenizer (`tokenizer.ggml.model = gpt2`)."""
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ModelLoadError(f"GGUF export supports byte-level BPE tokenizers, not {model.get('type')!r}.",
                             where="export_gguf")
    vocab, added, n = _vocabulary(spec, vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_TOKEN_UNUSED] * n
    for tok, idx in vocab.items():
        tokens[idx] = tok
        types[idx] = _TOKEN_NORMAL
    for idx, special in added.values():
        types[idx] = _TOKEN_CONTROL if special else _TOKEN_USER
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    else:  # readers drop an empty array; scores let transformers derive the (empty) merge list
        w.add_token_scores([0.0] * n)
    _write_special(w, tokenizer)


def _vocabulary(spec: dict[str, Any], vocab_size: int) -> tuple[dict[str, int], dict[str, tuple[int, bool]], int]:
    """(token -> id with the added tokens in, added token -> (id, special), table length) from a
    tokenizer.json; the table is at least the model's vocab_size (unused ids get placeholders)."""
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    added = {t["content"]: (t["id"], t.get("special", False)) for t in spec.get("added_tokens", [])}
    for content, (idx, _) in added.items():
        vocab[content] = idx
    return vocab, added, max(vocab_size, max(vocab.values()) + 1)


def _is_spm(spec: dict[str, Any]) -> bool:
    """A SentencePiece-style BPE (byte fallback, `▁` for spaces: Gemma, Llama 2), which llama.cpp
    runs as its `llama` tokenizer, rather than a byte-level BPE (`gpt2`)."""
    model = spec.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_CONTROL_SCORE = -1000.0  # what convert_hf_to_gguf gives control tokens


def _write_spm_tokenizer(w: Any, spec: dict[str, Any], tokenizer: Any, vocab_size: int, pre: str) -> None:
    """Tokens, scores and types for llama.cpp's SentencePiece tokenizer (`tokenizer.ggml.model =
    llama`). Its BPE merges the adjacent pair whose joined piece has the highest score; a
    SentencePiece BPE vocabulary is ordered by merge priority, so the score of piece i is -i
    (only the order matters). Byte pieces `<0xNN>` are BYTE, special added tokens CONTROL, other
    added tokens USER_DEFINED, the unknown token UNKNOWN."""
    vocab, added, n = _vocabulary(spec, vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_TOKEN_UNUSED] * n
    scores = [_CONTROL_SCORE] * n
    for tok, idx in vocab.items():
        tokens[idx] = tok
        types[idx] = _TOKEN_BYTE if _BYTE_PIECE.fullmatch(tok) else _TOKEN_NORMAL
        scores[idx] = 0.0 if types[idx] == _TOKEN_BYTE else -float(idx)
    for idx, special in added.values():
        types[idx] = _TOKEN_CONTROL if special else _TOKEN_USER
        scores[idx] = _CONTROL_SCORE if special else 0.0
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        types[int(unk)] = _TOKEN_UNKNOWN
    prepend = "Prepend" in json.dumps(spec.get("normalizer")) or "Metaspace" in json.dumps(spec.get("pre_tokenizer"))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(prepend)
    _write_special(w, tokenizer)


def _write_special(w: Any, tokenizer: Any) -> None:
    """Special ids, add-bos and the chat template."""
    for key, adder in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                       ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        idx = getattr(tokenizer, key, None)
        if idx is not None:
            adder(int(idx))
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)


def _permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (`convert_hf_to_gguf.LlamaModel.permute`)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _weight(module: nn.Module) -> torch.Tensor:
    deq = getattr(module, "dequantize_weight", None)  # qingzhou QuantLinear
    return deq() if callable(deq) else module.weight


def _arch_tensors(model: nn.Module):
    """(llama.cpp name, HF name, float tensor) triples in file order: q/k permuted where the
    architecture wants it, norms shifted for Gemma, biases where it has them, tied head omitted."""
    cfg = model.config
    arch = ARCHS[cfg.model_type]
    base = model.model
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)

    def norm(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float() + arch.norm_shift if arch.norm_shift else t

    yield "token_embd.weight", "model.embed_tokens.weight", base.embed_tokens.weight
    for i, layer in enumerate(base.layers):
        modules = dict(layer.named_modules())
        for hf, ll in arch.layer.items():
            m = modules[hf]
            t = _weight(m)
            if ll.endswith("norm"):
                t = norm(t)
            elif arch.permute_qk and hf == "self_attn.q_proj":
                t = _permute_rotary(t, n_head)
            elif arch.permute_qk and hf == "self_attn.k_proj":
                t = _permute_rotary(t, n_kv)
            yield f"blk.{i}.{ll}.weight", f"model.layers.{i}.{hf}.weight", t
            if getattr(m, "bias", None) is not None:
                if hf not in arch.biases:
                    raise ModelLoadError(f"{hf} of layer {i} has a bias, which {arch.name}-architecture GGUF has "
                                         "no tensor for.", where="export_gguf")
                yield f"blk.{i}.{ll}.bias", f"model.layers.{i}.{hf}.bias", m.bias
    yield "output_norm.weight", "model.norm.weight", norm(base.norm.weight)
    if not getattr(cfg, "tie_word_embeddings", False):
        yield "output.weight", "lm_head.weight", model.lm_head.weight

