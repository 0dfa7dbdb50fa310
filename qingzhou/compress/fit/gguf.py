"""A fit plan as a GGUF file: per-tensor GGML types for llama.cpp, chosen from the plan's bits.

The GGUF file is a second export of the same plan, not the GPTQ checkpoint re-packed: llama.cpp
has no GPTQ codes, so each linear's ORIGINAL (unquantised) weight is quantised with llama.cpp's
own block format for the bits the plan gave it (the group size does not carry over: each format
has its fixed block, 32 or 256 weights). Its size therefore differs from model.safetensors and
the report gives its own bytes.

Bits -> type (`GGUF_TYPE_OF_BITS`): 8 -> q8_0, 6 -> q6_k, 5 -> q5_k, 4 -> q4_k, 3 -> q3_k,
2 -> q2_k; keep -> f16 (or `keep="bf16"` / `"f32"`, e.g. for an fp32 model). A k-quant needs rows
(`in_features`) that are a multiple of 256; where they are not, llama.cpp's own fallback is taken
(`gguf_mix.shape_fallback`: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, F16
if not even 32 divides the row), so every tensor gets a type llama.cpp can load for its shape.
For SmolLM2 (576-wide rows) that makes 2-, 3- and 4-bit linears Q4_0/Q5_0 everywhere but
`down_proj` (1536 wide), so its GGUF is larger than the GPTQ file at low bits.
The rest of the model (embeddings, output head) is written in the keep type; norms stay F32.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qingzhou.errors import RecipeError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from qingzhou.compress.fit.storage import Option

GGUF_TYPE_OF_BITS = {8: "q8_0", 6: "q6_k", 5: "q5_k", 4: "q4_k", 3: "q3_k", 2: "q2_k"}
KEEP_TYPES = ("f16", "bf16", "f32")


def gguf_tensor_types(model: nn.Module, choice: Mapping[str, Option], keep: str = "f16") -> dict[str, str]:
    """{HF module name: GGML type name (lower case)} for each linear of the plan: the type of its
    bits, or `keep` for a kept linear, after llama.cpp's fallback for its row length (what
    `export_gguf` writes and llama.cpp loads)."""
    import gguf

    from qingzhou.compress.quantize.formats.gguf_mix import TENSOR_TYPES, shape_fallback

    if keep not in KEEP_TYPES:
        raise RecipeError(f"the GGUF type of kept linears must be one of {', '.join(KEEP_TYPES)}, not {keep!r}.",
                          where="fit gguf_keep")
    out: dict[str, str] = {}
    for name, o in choice.items():
        if o.keep:
            out[name] = keep
            continue
        want = GGUF_TYPE_OF_BITS.get(int(o.bits))  # type: ignore[arg-type]
        if want is None:
            raise RecipeError(f"{name} has {o.bits} bits, which no GGUF type stores.", where="fit gguf",
                              hint=f"GGUF export takes bits {sorted(GGUF_TYPE_OF_BITS)} or keep.")
        t = TENSOR_TYPES[want]
        ncols = int(model.get_submodule(name).in_features)
        if gguf.GGML_QUANT_SIZES[t][0] > 1:
            t = shape_fallback(t, ncols)
        out[name] = t.name.lower()
    return out


def check_gguf_model(model: nn.Module) -> None:
    """Refuse, before any measurement, a model the GGUF writer cannot export."""
    from qingzhou.compress.quantize.formats.gguf import SUPPORTED

    arch = getattr(getattr(model, "config", None), "model_type", None)
    if arch not in SUPPORTED:
        raise RecipeError(f"GGUF export supports {', '.join(SUPPORTED)} models, not {arch!r}.", where="fit gguf",
                          hint="Drop gguf (--gguf); the GPTQ folder is written for every architecture.")


def export_fit_gguf(model: nn.Module, tokenizer: Any, choice: Mapping[str, Option], path: str | Path, *,
                    keep: str = "f16") -> dict[str, Any]:
    """Write the plan as GGUF from `model`'s current (call it before the plan is applied: the
    original) weights. Returns `export_gguf`'s summary plus `linear_types` (the mapping)."""
    from qingzhou.compress.quantize.formats.gguf import export_gguf

    types = gguf_tensor_types(model, choice, keep)
    info = export_gguf(model, tokenizer, path, keep, tensor_types=types, overwrite=True)  # type: ignore[arg-type]
    info["linear_types"] = types
    return info
