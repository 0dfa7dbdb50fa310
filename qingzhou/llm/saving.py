"""Save a model as a plain Hugging Face folder (safetensors + config + tokenizer).

The output loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` and nothing else,
whatever the model came from (including GGUF). The folder is written atomically: a crash leaves
either the previous folder or none.
"""
from __future__ import annotations

from pathlib import Path

from qingzhou.io import atomic_dir


def save_model(model, tokenizer, out_dir: str | Path, *, max_shard_size: str = "2GB", overwrite: bool = False) -> Path:
    """Write `model` and `tokenizer` to `out_dir` as safetensors; return the folder. A non-empty
    `out_dir` is replaced only with `overwrite=True` and only if qingzhou wrote it."""
    from qingzhou.llm.loading import drop_quantizer_state

    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if method is not None and str(getattr(method, "value", method)) == "gguf":
        drop_quantizer_state(model)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite, what="model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
