"""On-disk cache of tokenised data, keyed by a hash of data + tokenizer + settings.

Tokenising 50k conversations takes minutes on a laptop; the second run of a recipe should not pay
it again. Entries are written atomically (a crash leaves no half entry) as safetensors (no pickle):
flat int32 ids/labels plus offsets.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qingzhou.data.packing import Example
from qingzhou.io import atomic_dir, atomic_write_json


def default_cache_dir() -> Path:
    root = os.environ.get("QINGZHOU_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "qingzhou")
    return Path(root).expanduser() / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything about a tokenizer that changes its output ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    specials = {k: str(getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    h.update(json.dumps(specials, sort_keys=True).encode("utf-8"))
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def cache_key(data_hash: str, tokenizer: Any, settings: dict[str, Any]) -> str:
    blob = json.dumps({"data": data_hash, "tok": tokenizer_fingerprint(tokenizer), "settings": settings, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def save_examples(path: Path, examples: list[Example], meta: dict[str, Any]) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat_ids = np.array([t for e in examples for t in e.input_ids], dtype=np.int32)
    flat_labels = np.array([t for e in examples for t in e.labels], dtype=np.int32)
    with atomic_dir(path, overwrite=True, what="data cache") as tmp:  # a cache entry of ours: replaceable
        save_file({"input_ids": flat_ids, "labels": flat_labels, "offsets": offsets}, str(tmp / "tokens.safetensors"))
        atomic_write_json(tmp / "meta.json", meta)
    return path


def load_examples(path: Path) -> tuple[list[Example], dict[str, Any]] | None:
    """The cached examples and their meta, or None when there is no complete entry."""
    tokens, meta_file = path / "tokens.safetensors", path / "meta.json"
    if not (tokens.is_file() and meta_file.is_file()):
        return None
    from safetensors.numpy import load_file

    arrays = load_file(str(tokens))
    ids, labels, offsets = arrays["input_ids"].tolist(), arrays["labels"].tolist(), arrays["offsets"].tolist()
    examples = [Example(ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    return examples, json.loads(meta_file.read_text(encoding="utf-8"))
