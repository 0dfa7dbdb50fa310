"""A GGUF file as a safetensors folder, converted once and reused: the big-model loader's way in.

GGUF tensors are block-quantized and must be dequantized to run in transformers, which
`from_pretrained(gguf_file=...)` does in memory. Doing that on every big load would hold the whole
dense model in RAM each time; so the first load writes the dequantized model (and tokenizer) as
sharded safetensors under the cache, keyed by the file's sha256, and every later load memory-maps
those shards like any other folder. The folder appears atomically (temp + rename): an interrupted
conversion leaves nothing that a later run would take for a cache hit.
"""
from __future__ import annotations

import os
from pathlib import Path

from qingzhou.errors import ModelLoadError


def cache_root() -> Path:
    root = os.environ.get("QINGZHOU_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "qingzhou")
    return Path(root).expanduser() / "gguf"


def gguf_to_safetensors(path: str | Path, cache: str | Path | None = None) -> Path:
    """The cache folder of `path`'s dequantized model (config, tokenizer, shards), made on first use."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qingzhou.io import atomic_dir, sha256_file
    from qingzhou.llm.gguf_meta import record_gguf_tokenizer

    path = Path(path)
    digest = sha256_file(path)
    folder = Path(cache or cache_root()) / digest[:32]
    if (folder / "config.json").is_file():
        return folder
    needed = path.stat().st_size * 4  # dequantized 16-bit tensors of a ~4-bit file, with margin
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else Path(cache or cache_root()).anchor).free
    if free < needed:
        raise ModelLoadError(f"not enough disk for the safetensors cache of {path.name}: about {needed / 2**30:.1f} GiB "
                             f"needed, {free / 2**30:.1f} GiB free in {folder.parent}.", where=str(path),
                             hint="Free disk space or point QINGZHOU_CACHE at a larger disk.")
    try:
        with atomic_dir(folder, what="GGUF safetensors cache") as tmp:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
            _drop_quantizer(model)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            record_gguf_tokenizer(tokenizer, str(path))
            model.save_pretrained(tmp, max_shard_size="2GB")
            tokenizer.save_pretrained(tmp)
            (tmp / "source.sha256").write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    except OSError as e:
        raise ModelLoadError(f"could not write the safetensors cache of {path.name}: {e}", where=str(folder),
                             hint="Nothing was kept; free disk space and run again.") from None
    return folder


def _drop_quantizer(model) -> None:
    """The GGUF "quantization" transformers records on a dequantized model would make the saved
    config claim GGUF quantization (the same cleanup as loading.drop_quantizer_state, which this
    module cannot import: loading imports it)."""
    model.hf_quantizer = None
    for attr, value in (("is_quantized", False), ("quantization_method", None)):
        try:
            setattr(model, attr, value)
        except AttributeError:
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
