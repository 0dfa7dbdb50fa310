"""The pruner table: method name -> function, its config class, whether it needs calibration data
and whether it reshapes the model. Filled by one decorator line in each method's file; the method
files are torch-free at import so configs validate instantly."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from qingzhou.registry import Registry

PRUNERS: Registry[Any] = Registry(
    "pruning method",
    modules=[f"qingzhou.compress.prune.{m}" for m in ("magnitude", "wanda", "sparsegpt", "structured")],
)


def register_pruner(name: str, config: type[BaseModel], *, needs_calibration: bool = True,
                    reshapes: bool = False):
    """Decorator: register `fn(model, cfg, plan, calib) -> dict` as pruner `name`.

    `plan` maps each full linear name to its `Target` (sparsity or N:M); the function rewrites the
    weights in place and returns `{"modules": {name: {...}}, "calibration": {...}}`. Methods that
    change the model's shape (`reshapes=True`, structured pruning) are called as
    `fn(model, cfg, calib, tokenizer=...)` and return their own report.
    """
    return PRUNERS.register(name, config, needs_calibration=needs_calibration, reshapes=reshapes)


def parse_config(data: dict[str, Any] | BaseModel) -> Any:
    """Validate a plain dict (from YAML/CLI) into the config of its `method` (typed configs pass)."""
    return PRUNERS.validate(data)
