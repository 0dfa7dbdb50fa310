"""The stage registry: one entry per stage kind, mapping a config model to one function.

Stage files live in `qingzhou/recipes/stages/` and are discovered automatically, so a new stage is
one file with one `@register_stage(...)` line. Stage files must not import torch at module level:
recipes are validated before torch is imported (a typo should fail in milliseconds, not after a
10-second import). The heavy public API (`qingzhou.llm`, `qingzhou.eval`, ...) is imported inside
the stage function.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # pragma: no cover
    from qingzhou.recipes.context import StageContext


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, `name` labels the stage in reports."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: str
    name: str | None = None

    @classmethod
    def recipe_keys(cls, raw: dict[str, Any]) -> list[str]:
        """Keys a recipe may write in this stage, for 'did you mean' hints. Stages that take a
        method's settings flat (quantize, prune) add that method's keys."""
        return list(cls.model_fields)

    def to_recipe(self) -> dict[str, Any]:
        """This stage as recipe YAML would write it (resolved_recipe.yaml, config hashes)."""
        return self.model_dump(mode="json")


def validate_method_config(data: dict[str, Any], specs: dict[str, Any], what: str) -> BaseModel:
    """Validate a plain dict (YAML/CLI) with the config of its `method` in a method registry
    (`specs[name].config`); an unknown method names the closest registered one."""
    from qingzhou.errors import RecipeError, did_you_mean

    method = data.get("method")
    if not isinstance(method, str) or method not in specs:
        raise RecipeError(f"unknown {what} method {method!r}.", where="method", hint=did_you_mean(str(method), specs))
    return specs[method].config.model_validate(data)  # a bad value: ValidationError (the CLI prints it as one paragraph)


class MethodStage(StageConfig):
    """A stage whose method settings sit flat beside `kind` (`method: gptq`, `bits: 4`, ...).

    The flat keys that are not the stage's own fields are validated by the chosen method's
    pydantic config (so a typo is reported at its own key path, with the closest valid key) and
    kept in `settings`; `to_recipe()` flattens them back, so a resolved recipe reads like the one
    the user wrote. Subclasses set `default_method` and implement `method_configs()` (and may
    override `parse_method` for stage-specific rules).
    """

    settings: dict[str, Any] = Field(default_factory=dict, description="the method config (filled from the flat keys)")
    default_method: ClassVar[str] = ""

    @classmethod
    def method_configs(cls) -> dict[str, type[BaseModel]]:
        raise NotImplementedError

    @classmethod
    def stage_keys(cls) -> set[str]:
        return set(cls.model_fields) - {"settings"}

    @classmethod
    def recipe_keys(cls, raw: dict[str, Any]) -> list[str]:
        config = cls.method_configs().get(raw.get("method", cls.default_method))
        return sorted(cls.stage_keys() | {"method"} | set(config.model_fields if config else ()))

    @classmethod
    def parse_method(cls, method: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
        from qingzhou.errors import did_you_mean

        configs = cls.method_configs()
        name = method["method"]
        if not isinstance(name, str) or name not in configs:
            raise ValueError(f"unknown method '{name}'. {did_you_mean(str(name), configs)}")
        return configs[name].model_validate(method).model_dump(mode="json")

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        keys = cls.stage_keys()
        stage = {k: v for k, v in data.items() if k in keys}
        method = {k: v for k, v in data.items() if k not in keys and k != "settings"}
        if set(method) <= {"method"} and isinstance(data.get("settings"), dict):  # resolved recipe read back
            method = {**data["settings"], **method}
        method.setdefault("method", cls.default_method)
        stage["settings"] = cls.parse_method(method, stage)
        return stage

    def to_recipe(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json", exclude={"settings"}), **self.settings}


@dataclass
class StageResult:
    """What a stage hands back to the runner: numbers for run.json and the report.

    A stage that produces a new model (finetune, quantize, prune ...) calls
    `ctx.set_model(...)` instead of returning it, so the runner can record the artifact.
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    data_hashes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config: type[StageConfig]
    run: Callable[[Any, StageContext], StageResult]
    doc: str


STAGES: dict[str, StageSpec] = {}


def register_stage(kind: str, config: type[StageConfig]):
    """Decorator: register `fn(cfg, ctx) -> StageResult` as the runner of stage `kind`."""

    def decorate(fn):
        if kind in STAGES and STAGES[kind].run is not fn:
            raise RuntimeError(f"stage kind {kind!r} registered twice")
        STAGES[kind] = StageSpec(kind, config, fn, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return decorate


_loaded = False


def load_stages() -> dict[str, StageSpec]:
    """Import every module in qingzhou/recipes/stages (cheap: they do not import torch)."""
    global _loaded
    if not _loaded:
        pkg = importlib.import_module("qingzhou.recipes.stages")
        for info in pkgutil.iter_modules(pkg.__path__, prefix="qingzhou.recipes.stages."):
            importlib.import_module(info.name)
        _loaded = True
    return STAGES


def stage_dir_name(index: int, kind: str) -> str:
    return f"{index:02d}-{kind}"


def builtin_recipe_dir() -> Path:
    return Path(__file__).parent / "builtin"
