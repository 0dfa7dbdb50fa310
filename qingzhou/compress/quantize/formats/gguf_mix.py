"""Which GGML type each tensor of a GGUF file gets: llama.cpp's rules for the file types users pick.

A "Q4_K_M" file is not all Q4_K: `llama-quantize` (src/llama-quant.cpp, `llama_tensor_get_type`)
gives some tensors more bits and falls back where a row does not fit a 256-wide super-block. We
follow those rules for the Llama-architecture models we export, so our Q4_K_M has the same tensor
types as llama.cpp's own Q4_K_M of the same model (for SmolLM2, whose 576-wide rows are not a
multiple of 256, that is mostly Q5_0):

* `use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2` (integer division);
* output.weight, and token_embd.weight when the embeddings are tied (no output.weight): Q8_0 if its
  rows are not a multiple of the default type's block, else Q6_K (unless the default is Q8_0);
* Q4_K_M / Q5_K_M: attn_v.weight of the i-th layer -> Q6_K when use_more_bits(i, #attn_v), and
  ffn_down.weight -> Q6_K when use_more_bits(i, n_layer);
* Q3_K_M: attn_v Q5_K for the first two, else Q4_K; ffn_down Q5_K for i < n_layer/16, else Q4_K;
  attn_output Q4_K. Q2_K: attn_v Q4_K with >= 4 query heads per kv head, else Q3_K; ffn_down and
  attn_output Q3_K. A 70B Llama (80 layers, GQA) has Q3_K/Q4_K attn_v raised to Q5_K;
* everything else: the file type's default (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0, F16, BF16, F32);
  1-D tensors and norms stay F32 (as `convert_hf_to_gguf.py` writes them);
* then the shape fallback (`tensor_type_fallback`): a row length not divisible by the type's block
  gives Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, and F16 if even 32 does not
  divide it.
Per-tensor overrides (llama-quantize's `--tensor-type`) replace the rule for that tensor (which then,
as there, does not count towards the attn_v/ffn_down layer index); the shape fallback still applies,
and unlike llama-quantize they also apply in f16/bf16/f32 files. qingzhou's `q4_0` keeps one deviation it always had: the (untied) token
embedding is Q8_0, where llama-quantize leaves it Q4_0.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import gguf

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclass(frozen=True)
class FileType:
    name: str
    file_type: int  # general.file_type
    default: T


FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in (
    FileType("f32", F.ALL_F32, T.F32), FileType("f16", F.MOSTLY_F16, T.F16), FileType("bf16", F.MOSTLY_BF16, T.BF16),
    FileType("q8_0", F.MOSTLY_Q8_0, T.Q8_0), FileType("q4_0", F.MOSTLY_Q4_0, T.Q4_0),
    FileType("q2_k", F.MOSTLY_Q2_K, T.Q2_K), FileType("q3_k_m", F.MOSTLY_Q3_K_M, T.Q3_K),
    FileType("q4_k_m", F.MOSTLY_Q4_K_M, T.Q4_K), FileType("q5_k_m", F.MOSTLY_Q5_K_M, T.Q5_K),
    FileType("q6_k", F.MOSTLY_Q6_K, T.Q6_K),
)}
# tensor types a per-tensor override may name (all of them we can write)
TENSOR_TYPES: dict[str, T] = {t.name.lower(): t for t in (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)}
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def block_size(t: T) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


def _is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def shape_fallback(t: T, ncols: int) -> T:
    """llama.cpp's `tensor_type_fallback`: a type whose block does not divide the row length."""
    if ncols % block_size(t) == 0:
        return t
    new = _FALLBACK.get(t, t)
    return new if ncols % block_size(new) == 0 else T.F16


def _rule(name: str, ncols: int, ft: FileType, state: dict[str, int], n_layer: int, tied: bool, is_70b: bool,
          n_gqa: int) -> T:
    """`llama_tensor_get_type_impl` for the file types in FILE_TYPES (dense Llama, no MoE)."""
    new = ft.default
    kmix = ft.name in ("q4_k_m", "q5_k_m")
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if ncols % block_size(new):
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if name == "token_embd.weight":
        return T.Q8_0 if ft.name == "q4_0" else new  # qingzhou's q4_0 deviation (see module doc)
    if "attn_v.weight" in name:
        i = state["i_attention_wv"]
        state["i_attention_wv"] += 1
        if ft.name == "q2_k":
            new = T.Q4_K if n_gqa >= 4 else T.Q3_K
        elif ft.name == "q3_k_m":
            new = T.Q5_K if i < 2 else T.Q4_K
        elif kmix and use_more_bits(i, state["n_attention_wv"]):
            new = T.Q6_K
        if is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
    elif "ffn_down" in name:
        i = state["i_ffn_down"]
        state["i_ffn_down"] += 1
        if ft.name == "q2_k":
            new = T.Q3_K
        elif ft.name == "q3_k_m":
            new = T.Q5_K if i < n_layer // 16 else T.Q4_K
        elif kmix and use_more_bits(i, n_layer):
            new = T.Q6_K
    elif "attn_output.weight" in name:
        new = {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K}.get(ft.name, new)
    return new


def plan_types(tensors: Iterable[tuple[str, tuple[int, ...]]], file_type: str, *, n_layer: int,
               n_head: int = 1, n_head_kv: int = 1, overrides: Mapping[str, str] | None = None) -> dict[str, T]:
    """GGML type per tensor, in file order, for `file_type` (a FILE_TYPES key).

    `tensors` are (llama.cpp name, numpy shape (rows, cols)) in the order they are written: the
    attn_v / ffn_down rules count tensors in that order, as llama-quantize does. `overrides` maps
    llama.cpp tensor names to TENSOR_TYPES keys. Raises KeyError for an unknown file type.
    """
    ft = FILE_TYPES[file_type]
    tensors = list(tensors)
    names = {n for n, _ in tensors}
    tied = "output.weight" not in names
    state = {"i_attention_wv": 0, "i_ffn_down": 0,
             "n_attention_wv": sum("attn_v.weight" in n for n, _ in tensors)}
    is_70b = n_layer == 80 and n_head != n_head_kv
    overrides = dict(overrides or {})
    out: dict[str, T] = {}
    for name, shape in tensors:
        if not _is_quantizable(name, shape):
            out[name] = T.F32
            continue
        ncols = int(shape[-1])
        if ft.default in (T.F32, T.F16, T.BF16) and name not in overrides:
            out[name] = ft.default
            continue
        # an overridden tensor skips the rule and so its attn_v/ffn_down count, as in llama-quantize
        t = TENSOR_TYPES[overrides[name]] if name in overrides else _rule(name, ncols, ft, state, n_layer, tied, is_70b,
                                                                              n_head // max(n_head_kv, 1))
        out[name] = shape_fallback(t, ncols) if gguf.GGML_QUANT_SIZES[t][0] > 1 else t
    return out
