"""A model with fresh weights from a transformers config: the starting point of pretraining from scratch.

Any architecture transformers knows works: `{"model_type": "llama", "hidden_size": 256, ...}` (the
other keys are that config class's fields), or a path to a `config.json` / model folder (only the
config is read; no weights, no remote code). The vocabulary and special-token ids come from the
tokenizer the corpus was encoded with, so the embedding matrix always matches the shards.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from qingzhou.errors import ModelLoadError


def scratch_config(architecture: dict[str, Any] | str | Path, *, tokenizer: Any, max_positions: int) -> Any:
    """The transformers config for `architecture`, sized to `tokenizer` and at least `max_positions`."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(architecture, dict):
        spec = dict(architecture)
        model_type = spec.pop("model_type", None)
        if not model_type:
            raise ModelLoadError("the architecture has no 'model_type' (e.g. llama, qwen2, gpt2, mistral).",
                                 where="architecture.model_type")
        try:
            config = AutoConfig.for_model(model_type, **spec)
        except ValueError:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            from qingzhou.errors import did_you_mean

            raise ModelLoadError(f"transformers knows no model_type '{model_type}'. {did_you_mean(model_type, list(CONFIG_MAPPING))}",
                                 where="architecture.model_type") from None
        known = set(type(config)().to_dict()) | set(PretrainedConfig().to_dict()) \
            | set(inspect.signature(type(config).__init__).parameters)
        unknown = sorted(k for k in spec if k not in known)  # for_model would keep a typo as a new attribute
        if unknown:
            raise ModelLoadError(f"{type(config).__name__} has no field(s) {unknown}.", where="architecture",
                                 hint=f"See transformers' {type(config).__name__} for the valid keys.")
    else:
        path = Path(architecture)
        if not path.exists():
            raise ModelLoadError("architecture config not found.", where=str(path),
                                 hint="Give a config.json, a model folder, or a mapping with model_type.")
        config = AutoConfig.from_pretrained(path.parent if path.is_file() else path, trust_remote_code=False)
    config.vocab_size = len(tokenizer)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, getattr(tokenizer, key))
    if getattr(config, "max_position_embeddings", max_positions) < max_positions:
        config.max_position_embeddings = max_positions
    config.use_cache = False
    return config


def model_from_config(config: Any, *, seed: int = 0, dtype: str = "float32") -> Any:
    """Randomly initialised causal LM for `config` (the architecture's own init, seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
