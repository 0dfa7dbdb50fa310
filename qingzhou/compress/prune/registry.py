"""Pruner registry: method name -> (config model, function). Filled by one decorator line in each
method's file; the method files are torch-free at import so configs validate instantly."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

# One line per method file (these modules import torch only inside their functions).
_METHOD_MODULES = ("magnitude", "wanda", "sparsegpt", "structured")


@dataclass(frozen=True)
class PrunerSpec:
    name: str
    config: type[BaseModel]
    run: Callable[..., Any]
    needs_calibration: bool
    reshapes: bool  # True: `run(model, cfg, calib, tokenizer=)` builds a smaller model, returns its own report


PRUNERS: dict[str, PrunerSpec] = {}


def register_pruner(name: str, config: type[BaseModel], *, needs_calibration: bool = True,
                    reshapes: bool = False):
    """Decorator: register `fn(model, cfg, plan, calib) -> dict` as pruner `name`.

    `plan` maps each full linear name to its `Target` (sparsity or N:M); the function rewrites the
    weights in place and returns `{"modules": {name: {...}}, "calibration": {...}}`. Methods that
    change the model's shape (`reshapes=True`, structured pruning) are called as
    `fn(model, cfg, calib, tokenizer=...)` and return their own report.
    """

    def decorate(fn):
        if name in PRUNERS and PRUNERS[name].run is not fn:
            raise RuntimeError(f"pruner {name!r} registered twice")
        PRUNERS[name] = PrunerSpec(name, config, fn, needs_calibration, reshapes)
        return fn

    return decorate


def load_pruners() -> dict[str, PrunerSpec]:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"qingzhou.compress.prune.{mod}")
    return PRUNERS


def parse_config(data: dict[str, Any] | BaseModel) -> Any:
    """Validate a plain dict (from YAML/CLI) into the config of its `method`."""
    from qingzhou.recipes.registry import validate_method_config

    if isinstance(data, BaseModel):
        return data
    return validate_method_config(data, load_pruners(), "pruning")
