"""A few metadata values from a GGUF file's header, read without parsing its tensors or vocabulary.

transformers turns a GGUF tokenizer into a `tokenizers` one and drops what it does not map, among
it `tokenizer.ggml.pre`: llama.cpp's name for the model's pre-tokenizer (the regex it splits text
with, and whether it cleans spaces when detokenising). A model loaded from a GGUF file and exported
back to GGUF must carry the original name, so the loader records it on the tokenizer
(`record_gguf_tokenizer`) under `GGUF_PRE_KEY` in `init_kwargs`: that survives
`save_pretrained` (tokenizer_config.json) and reloading, so a run that saves the model to a folder
and exports GGUF later still knows it.

`gguf.GGUFReader` would do, but it builds every field (49k vocabulary strings for SmolLM2), about
2 s per call; this reads the key/value header only up to the keys asked for.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from qingzhou.errors import ModelLoadError

GGUF_PRE_KEY = "gguf_pre_tokenizer"  # tokenizer init_kwargs / tokenizer_config.json key
PRE = "tokenizer.ggml.pre"

# GGUF value types (gguf.GGUFValueType): fixed-size scalars, then string = 8 and array = 9.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def gguf_metadata(path: str | Path, keys: list[str]) -> dict[str, Any]:
    """The values of `keys` present in the GGUF file at `path` (absent keys are left out).
    Scalars and strings only; an array value is returned as None. Files of GGUF version 1 or in
    big-endian byte order give {} (nothing qingzhou needs is worth a second parser)."""
    wanted, out = set(keys), {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError("not a GGUF file (bad magic).", where=str(path))
        (version,) = _unpack(f, "<I")
        if version not in (2, 3):
            return {}
        _, n_kv = _unpack(f, "<QQ")
        for _ in range(n_kv):
            key = _string(f)
            (vtype,) = _unpack(f, "<I")
            if key in wanted:
                out[key] = _value(f, vtype)
                if len(out) == len(wanted):
                    break
            else:
                _skip(f, vtype)
    return out


def record_gguf_tokenizer(tokenizer: Any, path: str | Path) -> None:
    """Keep the GGUF's `tokenizer.ggml.pre` on `tokenizer` (see the module docstring)."""
    pre = gguf_metadata(path, [PRE]).get(PRE)
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    if isinstance(pre, str) and pre and isinstance(init_kwargs, dict):
        init_kwargs[GGUF_PRE_KEY] = pre


def recorded_gguf_pre(tokenizer: Any) -> str | None:
    """The pre-tokenizer name `record_gguf_tokenizer` kept (also after a save and reload), or None."""
    pre = (getattr(tokenizer, "init_kwargs", None) or {}).get(GGUF_PRE_KEY)
    return pre if isinstance(pre, str) and pre else None


def _unpack(f: BinaryIO, fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelLoadError("GGUF header ends early (truncated file?).", where=getattr(f, "name", "gguf"))
    return struct.unpack(fmt, data)


def _string(f: BinaryIO) -> str:
    (n,) = _unpack(f, "<Q")
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype == _STRING:
        return _string(f)
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])[0]
    _skip(f, vtype)
    return None


def _skip(f: BinaryIO, vtype: int) -> None:
    if vtype == _STRING:
        (n,) = _unpack(f, "<Q")
        f.seek(n, 1)
    elif vtype in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[vtype]), 1)
    elif vtype == _ARRAY:
        etype, count = _unpack(f, "<IQ")
        if etype in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[etype]), 1)
        else:
            for _ in range(count):
                _skip(f, etype)
    else:
        raise ModelLoadError(f"unknown GGUF value type {vtype} in the header.", where=getattr(f, "name", "gguf"))
