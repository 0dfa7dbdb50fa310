"""Lazy package attributes: public names resolve to their module only when first used, so that
`import qingzhou` (and recipe validation) never imports torch."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `table[name]` and returns its attribute `name`."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def lazy_exports(package: str, table: Mapping[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """`__getattr__` and `__all__` for a package whose public names live in its submodules.

    `table` maps a module (relative to `package` when it starts with '.') to the space-separated
    names it exports: `{".api": "quantize QuantizeReport", ".config": "QuantizeConfig"}`.
    """
    where = {name: (package + module if module.startswith(".") else module)
             for module, names in table.items() for name in names.split()}
    return lazy_getattr(package, where), sorted(where)
