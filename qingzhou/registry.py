"""The one registry: name -> (thing, optional typed config, metadata), filled by a decorator.

Every pluggable piece of qingzhou (recipe stages, quantizers, pruners, fine-tuning methods,
optimizers, model aliases, task kinds, built-in data sets) is an instance of `Registry`, so a new
method is one file with one decorator line, and every lookup fails the same way: an unknown name is
a user error that names the closest registered one.

A registry can name the modules that fill it (`modules=`, imported on first lookup), so a registry
is complete without importing its members eagerly. Those modules must be torch-free at import:
recipes and CLI flags are validated against the registered configs before torch loads. A method
registered from anywhere else (a user's notebook, a test module) is just as reachable from the API,
recipes and the CLI, because they all look it up here.

This module sits below every layer (it imports only `qingzhou.errors` and pydantic).
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from qingzhou.errors import QingzhouError, RecipeError, did_you_mean

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing: its name, the object itself, its typed config (if it takes one),
    free-form metadata the owning layer reads (`needs_calibration`, `mergeable` ...), and the
    first line of its docstring for listings."""

    name: str
    obj: T
    config: type[BaseModel] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


class Registry(Generic[T]):
    """A named table of `Entry`s filled by `@registry.register(name, config, **meta)`.

    `what` names the kind of thing in errors ("quantization method"). `modules` are imported the
    first time the registry is read; `package` imports every module of a package instead.
    `error` is the `QingzhouError` subclass raised for an unknown name.
    """

    def __init__(self, what: str, *, modules: Sequence[str] = (), package: str | None = None,
                 error: type[QingzhouError] = RecipeError):
        self.what = what
        self._modules = tuple(modules)
        self._package = package
        self._error = error
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = not (modules or package)

    # ------------------------------------------------------------------ filling
    def register(self, name: str, config: type[BaseModel] | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: register `obj` under `name` (re-registering the same object is a no-op, a
        different one is a programming error)."""

        def decorate(obj: T) -> T:
            self.add(name, obj, config, **meta)
            return obj

        return decorate

    def add(self, name: str, obj: T, config: type[BaseModel] | None = None, **meta: Any) -> Entry[T]:
        old = self._entries.get(name)
        if old is not None and old.obj is not obj:
            raise RuntimeError(f"{self.what} {name!r} registered twice")
        doc = (getattr(obj, "__doc__", None) or "").strip().split("\n")[0] if callable(obj) else ""
        entry = Entry(name, obj, config, dict(meta), doc)
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget `name` (a notebook or test that registered something temporary)."""
        self._entries.pop(name, None)

    def load(self) -> Registry[T]:
        """Import the modules that register into this table (once)."""
        if not self._loaded:
            self._loaded = True
            for mod in self._modules:
                importlib.import_module(mod)
            if self._package:
                pkg = importlib.import_module(self._package)
                for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{self._package}."):
                    importlib.import_module(info.name)
        return self

    # ------------------------------------------------------------------ reading
    def get(self, name: str, *, where: str | None = None) -> Entry[T]:
        """The entry called `name`, or a user error naming the closest registered one."""
        self.load()
        entry = self._entries.get(name)
        if entry is None:
            raise self._error(f"unknown {self.what} {name!r}.", where=where,
                              hint=did_you_mean(str(name), self._entries))
        return entry

    def find(self, name: str) -> Entry[T] | None:
        self.load()
        return self._entries.get(name)

    def names(self) -> list[str]:
        return list(self.load()._entries)

    def entries(self) -> list[Entry[T]]:
        return list(self.load()._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self.load()._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.load()._entries)

    def __getitem__(self, name: str) -> Entry[T]:
        return self.get(name)

    # ------------------------------------------------------------------ configs
    def validate(self, data: dict[str, Any] | BaseModel, *, key: str = "method", where: str | None = None) -> Any:
        """Validate a plain dict (YAML, CLI flags) into the typed config of the entry its `key`
        names. A config object that is already typed passes through: each config is validated
        exactly once, wherever it enters. A bad setting raises pydantic's ValidationError, which
        the recipe loader maps to YAML lines and the CLI to flag names."""
        if isinstance(data, BaseModel):
            return data
        entry = self.get(str(data.get(key)), where=where or key)
        if entry.config is None:
            raise RuntimeError(f"{self.what} {entry.name!r} takes no config")
        return entry.config.model_validate(data)

    def configs(self) -> dict[str, type[BaseModel]]:
        """name -> config class, for entries that take one."""
        return {e.name: e.config for e in self.entries() if e.config is not None}

