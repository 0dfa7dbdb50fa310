"""The stage registry: one entry per stage kind, mapping a config model to one function.

Stage files live in `qingzhou/recipes/stages/` and are discovered automatically, so a new stage is
one file with one `@register_stage(...)` line. Stage files must not import torch at module level:
recipes are validated before torch is imported (a typo should fail in milliseconds, not after a
10-second import). The heavy public API (`qingzhou.llm`, `qingzhou.eval`, ...) is imported inside
the stage function.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qingzhou.registry import Registry


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


class MethodStage(StageConfig):
    """A stage whose method settings sit flat beside `kind` (`method: gptq`, `bits: 4`, ...).

    The flat keys that are not the stage's own fields are validated once, by the chosen method's
    pydantic config from the stage's method registry (so a typo is reported at its own key path,
    with the closest valid key), and kept as that typed config in `settings`, which the stage
    hands straight to the verb; `to_recipe()` flattens it back, so a resolved recipe reads like the
    one the user wrote. Subclasses set `default_method` and `methods()` (and may override
    `parse_method` for stage-specific rules).
    """

    settings: Any = Field(None, description="the method's typed config (filled from the flat keys)")
    default_method: ClassVar[str] = ""

    @classmethod
    def methods(cls) -> Registry[Any]:
        """The registry this stage's `method:` names an entry of."""
        raise NotImplementedError

    @classmethod
    def stage_keys(cls) -> set[str]:
        return set(cls.model_fields) - {"settings"}

    @classmethod
    def recipe_keys(cls, raw: dict[str, Any]) -> list[str]:
        entry = cls.methods().find(str(raw.get("method", cls.default_method)))
        config = entry.config if entry else None
        return sorted(cls.stage_keys() | {"method"} | set(config.model_fields if config else ()))

    @classmethod
    def parse_method(cls, method: dict[str, Any], stage: dict[str, Any]) -> Any:
        """The typed method config for the flat `method` keys (a ValueError names an unknown method,
        so pydantic reports it at the stage's `method` key)."""
        from qingzhou.errors import QingzhouError

        try:
            return cls.methods().validate(method)
        except QingzhouError as e:
            raise ValueError(f"{e.message} {e.hint or ''}".strip()) from None

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        keys = cls.stage_keys()
        stage = {k: v for k, v in data.items() if k in keys}
        settings = data.get("settings")
        if isinstance(settings, BaseModel):  # already typed (built in Python): validated once
            stage["settings"] = settings
            return stage
        method = {k: v for k, v in data.items() if k not in keys and k != "settings"}
        if set(method) <= {"method"} and isinstance(settings, dict):  # resolved recipe read back
            method = {**settings, **method}
        method.setdefault("method", cls.default_method)
        stage["settings"] = cls.parse_method(method, stage)
        return stage

    @property
    def method(self) -> str:
        return self.method_settings()["method"]

    def method_settings(self) -> dict[str, Any]:
        """The method's settings as plain data (what the recipe holds flat)."""
        s = self.settings
        return s.model_dump(mode="json") if isinstance(s, BaseModel) else dict(s or {})

    def to_recipe(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json", exclude={"settings"}), **self.method_settings()}


@dataclass
class StageResult:
    """What a stage hands back to the runner: numbers for run.json and the report.

    A stage that produces a new model (finetune, quantize, prune ...) calls
    `ctx.set_model(...)` instead of returning it, so the runner can record the artifact.
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    data_hashes: dict[str, str] = field(default_factory=dict)


# kind -> `fn(cfg, ctx) -> StageResult`, config = the stage's StageConfig subclass. Every module in
# qingzhou/recipes/stages registers one stage (imported on first lookup; they are torch-free).
STAGES: Registry[Callable[[Any, Any], StageResult]] = Registry("stage kind", package="qingzhou.recipes.stages")


def register_stage(kind: str, config: type[StageConfig]):
    """Decorator: register `fn(cfg, ctx) -> StageResult` as the runner of stage `kind`."""
    return STAGES.register(kind, config)


def stage_dir_name(index: int, kind: str) -> str:
    return f"{index:02d}-{kind}"


def builtin_recipe_dir() -> Path:
    return Path(__file__).parent / "builtin"
