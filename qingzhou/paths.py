"""Which strings name local files and which may be Hugging Face hub ids.

A path with a typo must fail as "not found", not turn into a network request for a hub repository
of that name (which, offline, ends in a confusing connection error, and online may download
something the user never meant). So only strings shaped like `org/name`, that do not start like a
path (`.`, `/`, `~`), do not end in a file suffix and do not exist locally, are hub ids.
"""
from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Suffixes of files users point at (data, weights, configs, archives). A hub repository name may
# contain dots (`Qwen/Qwen2.5-0.5B`), so only these suffixes mark a string as a local file.
FILE_SUFFIXES = frozenset({
    ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".text", ".md", ".raw",
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf", ".onnx", ".h5", ".msgpack",
    ".npy", ".npz", ".yaml", ".yml", ".jinja", ".gz", ".zip", ".tar", ".xz", ".bz2", ".zst",
})


def looks_like_path(text: str) -> bool:
    """True for strings that can only mean a local file or folder."""
    text = str(text)
    return (text.startswith((".", "/", "~")) or "\\" in text or Path(text).suffix.lower() in FILE_SUFFIXES
            or not HUB_ID.match(text))


def is_hub_id(text: str) -> bool:
    """True when `text` may be sent to the hub: `org/name` shaped, no file suffix, not a local path."""
    text = str(text)
    return not looks_like_path(text) and not Path(text).expanduser().exists()
