"""Models and tokenizers: load/save, the alias registry, the device layer, generation."""
from qingzhou.llm.aliases import ALIASES, register_alias, resolve_alias
from qingzhou.llm.generate import GenerationResult, generate
from qingzhou.llm.loading import ModelSource, describe_model, drop_quantizer_state, load_model, model_size, resolve_source
from qingzhou.llm.saving import save_model

__all__ = [
    "ALIASES",
    "GenerationResult",
    "ModelSource",
    "describe_model",
    "drop_quantizer_state",
    "generate",
    "load_model",
    "model_size",
    "register_alias",
    "resolve_alias",
    "resolve_source",
    "save_model",
]
