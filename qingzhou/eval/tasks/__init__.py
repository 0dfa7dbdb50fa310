"""The task registry: every `*.yaml` in `builtin/` is one task; adding a task is adding a file.

`load_task` also accepts the path of a YAML file outside the package, so users can evaluate their
own tasks without touching qingzhou.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import ValidationError

from qingzhou import yamlfile
from qingzhou.errors import TaskError, did_you_mean
from qingzhou.eval.tasks.spec import TaskSpec

BUILTIN_DIR = Path(__file__).parent / "builtin"


def _read_spec(path: Path) -> TaskSpec:
    """Read, validate and bind a task file; errors name `file:line: key`."""
    data, text = yamlfile.load(path, error=TaskError)
    lines = yamlfile.key_lines(text)
    if not isinstance(data, dict):
        raise TaskError(f"a task file must be a mapping (task, kind, metrics, ...), got {type(data).__name__}.",
                        where=str(path))
    try:
        spec = TaskSpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(first["loc"])
        got = first.get("input")
        detail = f" (got {got!r})" if first["type"] != "missing" and not isinstance(got, dict | list) else ""
        raise TaskError(f"{first['msg']}{detail}.", where=yamlfile.where(str(path), lines, loc)) from None
    return spec.bind_source(str(path), lines)


@lru_cache(maxsize=1)
def builtin_tasks() -> dict[str, Path]:
    """Task name -> YAML path for the tasks shipped with qingzhou."""
    out = {}
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        out[_read_spec(path).task] = path
    return out


def list_tasks() -> list[str]:
    return sorted(builtin_tasks())


def load_task(name_or_path: str | Path) -> TaskSpec:
    """A shipped task by name, or any task YAML file by path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise TaskError(f"task file {str(candidate)!r} not found.")
        return _read_spec(candidate)
    tasks = builtin_tasks()
    if str(name_or_path) not in tasks:
        raise TaskError(f"unknown task {str(name_or_path)!r}.", where="tasks",
                          hint=did_you_mean(str(name_or_path), tasks))
    return _read_spec(tasks[str(name_or_path)])


__all__ = ["TaskSpec", "list_tasks", "load_task", "builtin_tasks"]
