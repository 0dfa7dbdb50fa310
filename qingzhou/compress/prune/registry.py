"""Pruner registry: method name -> (config model, function). Filled by one decorator line in each
method's file; the method files are torch-free at import so configs validate instantly."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qingzhou.compress.prune.config import PruneConfig

# One line per method file (these modules import torch only inside their functions).
_METHOD_MODULES = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class PrunerSpec:
    name: str
    config: type[PruneConfig]
    run: Callable[..., Any]
    needs_calibration: bool


PRUNERS: dict[str, PrunerSpec] = {}


def register_pruner(name: str, config: type[PruneConfig], *, needs_calibration: bool = True):
    """Decorator: register `fn(model, cfg, plan, calib) -> dict` as pruner `name`.

    `plan` maps each full linear name to its `Target` (sparsity or N:M); the function rewrites the
    weights in place and returns `{"modules": {name: {...}}, "calibration": {...}}`.
    """

    def decorate(fn):
        if name in PRUNERS and PRUNERS[name].run is not fn:
            raise RuntimeError(f"pruner {name!r} registered twice")
        PRUNERS[name] = PrunerSpec(name, config, fn, needs_calibration)
        return fn

    return decorate


def load_pruners() -> dict[str, PrunerSpec]:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"qingzhou.compress.prune.{mod}")
    return PRUNERS


def parse_config(data: dict[str, Any] | PruneConfig) -> PruneConfig:
    """Validate a plain dict (from YAML/CLI) into the config of its `method`."""
    from qingzhou.errors import RecipeError, did_you_mean

    if isinstance(data, PruneConfig):
        return data
    specs = load_pruners()
    method = data.get("method")
    if method not in specs:
        raise RecipeError(f"unknown pruning method {method!r}.", where="method",
                          hint=did_you_mean(str(method), specs))
    return specs[method].config.model_validate(data)
