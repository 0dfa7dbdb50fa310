"""Everything a recipe names outside itself - models, data and text files, calibration sets, task
files, folders, devices - checked during validation, before any model loads.

A missing data file in the fifth stage must fail in milliseconds naming `file:line: stages.4.data`,
not after the first four stages ran. The checks are torch-free except for an explicit accelerator
request (`device: cuda`), which asks the device layer.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qingzhou import yamlfile
from qingzhou.errors import DataError, QingzhouError, RecipeError

_DATA = [("data", "data"), ("data.source", "data"), ("data.eval_source", "data"), ("data.template", "template")]
# stage kind -> (key path inside the stage, what it names); `*` walks a list. Devices are found by
# key name (`device`) in every stage, so a new stage's device setting is checked without an entry.
INPUTS: dict[str, list[tuple[str, str]]] = {
    "load": [("model", "model")],
    "eval": [("perplexity.data", "text"), ("tasks.*", "task"), ("data_dir", "folder")],
    "finetune": _DATA,
    "distill": [("teacher", "teacher"), *_DATA],
    "quantize": [("calibration.source", "calibration")],
    "prune": [("calibration.source", "calibration")],
    "moefy": [("calibration.source", "calibration"), ("evaluate.text", "text")],
    "export": [("adapter", "adapter"), ("base", "model")],
}


def _model(value: str, stage: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    from qingzhou.llm.loading import resolve_source

    resolve_source(value, allow_pickle=bool(stage.get("allow_pickle", False)))


def _teacher(value: str, stage: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    if value == "base":
        if not any(s.get("kind") == "load" for s in earlier):
            raise RecipeError("teacher 'base' means the model of an earlier `kind: load` stage, and there is none.")
        return
    if any(s.get("name") == value for s in earlier):  # an earlier stage's model
        return
    _model(value, {}, earlier)


def _adapter(value: str, stage: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"adapter folder not found: {value}")
    if not (path / "adapter_config.json").is_file():
        raise DataError(f"{value} is not a peft adapter folder (no adapter_config.json).")


def _builtin(value: str) -> bool:
    if value.startswith("builtin:"):
        from qingzhou.data.sources import resolve_builtin

        resolve_builtin(value.split(":", 1)[1])
        return True
    return False


def _file(value: str, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise DataError(f"{what} not found: {value}", hint="Relative paths are read from the working directory.")
    if path.is_dir():
        raise DataError(f"{what} {value} is a folder, not a file.")
    return path


def _text(value: str, stage: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    if _builtin(value) or value.startswith("hf:"):
        return
    _file(value, "text file")


def _data(value: str, stage: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    from qingzhou.paths import is_hub_id

    if _builtin(value) or value.startswith("hub:") or is_hub_id(value.partition(":")[0]):
        return
    from qingzhou.data.sources import LOCAL_SUFFIXES

    _typed_file(value, "data", sorted(LOCAL_SUFFIXES), f"Supported: {', '.join(sorted(LOCAL_SUFFIXES))}.")


def _template(value: str, stage: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    if value.endswith(".jinja"):
        _file(value, "chat template file")


CALIBRATION_SUFFIXES = (".jsonl", ".json", ".txt", ".raw", ".md")


def _calibration(value: str, stage: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    if _builtin(value):
        return
    _typed_file(value, "calibration", CALIBRATION_SUFFIXES, f"Use {', '.join(CALIBRATION_SUFFIXES)} or builtin:calib.")


def _typed_file(value: str, what: str, suffixes: Any, hint: str) -> None:
    """`value` must be an existing `what` file with one of `suffixes`."""
    path = _file(value, f"{what} file")
    if path.suffix.lower() not in suffixes:
        raise DataError(f"unsupported {what} file type '{path.suffix}': {value}", hint=hint)


def _task(value: str, stage: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    from qingzhou.eval.tasks import load_task

    load_task(value)


def _folder(value: str, stage: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    if not Path(value).expanduser().is_dir():
        raise DataError(f"folder not found: {value}")


CHECKS: dict[str, Callable[[str, dict[str, Any], list[dict[str, Any]]], None]] = {
    "model": _model, "teacher": _teacher, "adapter": _adapter, "text": _text, "data": _data,
    "template": _template, "calibration": _calibration, "task": _task, "folder": _folder,
}


def _values(node: Any, keys: list[str], path: tuple) -> list[tuple[tuple, Any]]:
    """(key path, value) for every value at `keys` ('*' = each list item) under `node`."""
    if not keys:
        return [(path, node)]
    key, rest = keys[0], keys[1:]
    if key == "*":
        if not isinstance(node, list):
            return []
        return [hit for i, item in enumerate(node) for hit in _values(item, rest, (*path, i))]
    if not isinstance(node, dict) or node.get(key) is None:
        return []
    return _values(node[key], rest, (*path, key))


def _devices(node: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """Every `device: X` setting in a stage, at any depth."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "device" and isinstance(value, str):
                found.append(((*path, key), value))
            else:
                found.extend(_devices(value, (*path, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_devices(value, (*path, i)))
    return found


def check_recipe_inputs(recipe: Any, text: str | None = None) -> None:
    """Raise RecipeError (file:line: stages.N.key (kind stage): problem) for the first input of
    `recipe` that does not exist, is not what its key expects, or names an unavailable device."""
    lines = yamlfile.key_lines(text) if text else {}
    earlier: list[dict[str, Any]] = []
    for i, cfg in enumerate(recipe.stages):
        stage = cfg.to_recipe()
        checks = [(p, v, CHECKS[what]) for key, what in INPUTS.get(cfg.kind, [])
                  for p, v in _values(stage, key.split("."), ()) if isinstance(v, str)]
        checks += [(p, v, _device) for p, v in _devices(stage)]
        for key_path, value, check in checks:
            try:
                check(value, stage, earlier)
            except QingzhouError as e:
                where = yamlfile.where(recipe.source, lines, ("stages", i, *key_path))
                message = e.message if e.where is None else f"{e.where}: {e.message}"
                raise RecipeError(f"{message}", where=f"{where} ({cfg.kind} stage)", hint=e.hint) from None
        earlier.append(stage)


def _device(value: str, stage: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    if value.strip().lower() in ("", "auto", "cpu"):
        return
    from qingzhou.llm.devices import resolve_device

    resolve_device(value)
