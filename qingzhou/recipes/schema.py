"""Recipe files: parse YAML, apply `-s key=value` overrides, validate every stage, torch-free.

A recipe is `name`, `description`, `seed` and a list of `stages`, each a mapping with a `kind`
that picks its config model from the stage registry. Errors name the file, the line, the key path
(`stages.1.lr`) and, for an unknown key, the closest valid key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qingzhou import yamlfile
from qingzhou.errors import RecipeError, closest, did_you_mean
from qingzhou.recipes.registry import STAGES, StageConfig, builtin_recipe_dir


class RecipeHeader(BaseModel):
    """The top level of a recipe; stages are validated one by one against the registry."""

    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    description: str = ""
    seed: int = 0
    stages: list[Any] = Field(min_length=1)


@dataclass
class Recipe:
    name: str
    description: str
    seed: int
    stages: list[StageConfig]
    source: str = "<memory>"
    overrides: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "stages": [s.to_recipe() for s in self.stages],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------- lines

key_lines = yamlfile.key_lines
_where = yamlfile.where


# ------------------------------------------------------------------------------------ overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"bad override '{text}'.", hint="Expected KEY.PATH=VALUE, e.g. -s stages.1.seq_len=256.")
    key, _, raw = text.partition("=")
    value = yamlfile.scalar(raw) if raw.strip() else ""
    return [p for p in key.strip().split(".") if p], value


def apply_override(data: dict[str, Any], text: str) -> None:
    """Set `a.b.0.c=value` in the raw recipe dict; values are parsed as YAML (1e-4, true, [a, b])."""
    keys, value = parse_override(text)
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        here = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"override '{text}': '{here}' is not an index of a list of {len(node)} items.")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value  # unknown keys are caught (with a suggestion) by validation
            else:
                if key not in node:
                    hint = f"Did you mean '{closest(key, node)}'?" if closest(key, node) else None
                    raise RecipeError(f"override '{text}': no key '{here}' in the recipe.", hint=hint)
                node = node[key]
        else:
            raise RecipeError(f"override '{text}': '{'.'.join(keys[:i])}' is a value, not a section.")


# ----------------------------------------------------------------------------------- validation


def _fields_at(model: type[BaseModel], loc: tuple, raw: Any = None) -> list[str]:
    """Valid keys of the (possibly nested) config model that `loc` points into."""
    import typing

    if len(loc) == 1 and isinstance(raw, dict) and hasattr(model, "recipe_keys"):
        return model.recipe_keys(raw)
    for key in loc[:-1]:
        field_info = model.model_fields.get(str(key)) if isinstance(key, str) else None
        if field_info is None:
            break
        candidates = [field_info.annotation, *typing.get_args(field_info.annotation)]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            break
        model = nested
    return list(model.model_fields)


def _pydantic_to_recipe_error(err: ValidationError, source: str, lines: dict[tuple, int], prefix: tuple, model: type[BaseModel], raw: Any = None) -> RecipeError:
    problems = []
    first_where = None
    for e in err.errors():
        path = (*prefix, *e["loc"])
        where = _where(source, lines, path)
        first_where = first_where or where
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            fields = _fields_at(model, tuple(e["loc"]), raw)
            match = closest(key, fields)
            msg = f"unknown key '{key}'" + (f"; did you mean '{match}'?" if match else f"; valid keys: {', '.join(fields)}")
        elif e["type"] == "missing":
            msg = "this key is required"
        else:
            got = e.get("input")
            msg = f"{e['msg']} (got {got!r})" if not isinstance(got, dict | list) else e["msg"]
        problems.append(f"{where}: {msg}")
    return RecipeError("; ".join(problems))


def validate_recipe(data: Any, *, source: str = "<recipe>", text: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Turn a raw recipe mapping into a validated `Recipe` (raises RecipeError)."""
    lines = key_lines(text) if text else {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping with 'stages', got {type(data).__name__}.", where=source)
    try:
        header = RecipeHeader.model_validate(data)
    except ValidationError as e:
        raise _pydantic_to_recipe_error(e, source, lines, (), RecipeHeader) from None
    configs: list[StageConfig] = []
    for i, raw in enumerate(header.stages):
        path = ("stages", i)
        if not isinstance(raw, dict):
            raise RecipeError(f"each stage must be a mapping with a 'kind', got {raw!r}.", where=_where(source, lines, path))
        kind = raw.get("kind")
        if kind is None:
            raise RecipeError("stage has no 'kind'.", where=_where(source, lines, path), hint=f"Valid kinds: {', '.join(sorted(STAGES))}.")
        if not isinstance(kind, str) or kind not in STAGES:
            raise RecipeError(f"unknown stage kind '{kind}'.", where=_where(source, lines, (*path, "kind")), hint=did_you_mean(str(kind), STAGES))
        spec = STAGES.get(kind)
        try:
            configs.append(spec.config.model_validate(raw))
        except ValidationError as e:
            raise _pydantic_to_recipe_error(e, source, lines, path, spec.config, raw) from None
    return Recipe(header.name, header.description, header.seed, configs, source, list(overrides or []))


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(builtin_recipe_dir().glob("*.yaml"))}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or the built-in recipe of that name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtin = builtin_recipes()
    if str(name_or_path) in builtin:
        return builtin[str(name_or_path)]
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        raise RecipeError(f"recipe file not found: {path}")
    raise RecipeError(f"no recipe file or built-in recipe named '{name_or_path}'.", hint=did_you_mean(str(name_or_path), builtin))


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check_inputs: bool = True) -> Recipe:
    """Read, override and validate a recipe file or built-in recipe name.

    With `check_inputs` (the default) every file, folder, model, task and device the recipe names
    is checked too (`check_recipe_inputs`), so a typo fails here and not after a model has loaded.
    """
    path = find_recipe(name_or_path)
    data, text = yamlfile.load(path)
    if data is None:
        raise RecipeError("the recipe file is empty.", where=str(path))
    for override in overrides:
        if isinstance(data, dict):
            apply_override(data, override)
    recipe = validate_recipe(data, source=str(path), text=text, overrides=list(overrides))
    if check_inputs:
        from qingzhou.recipes.inputs import check_recipe_inputs

        check_recipe_inputs(recipe, text)
    return recipe
