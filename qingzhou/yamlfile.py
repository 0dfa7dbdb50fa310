"""Reading the YAML files users write (recipes, task files): UTF-8 and YAML errors with their line,
and the line of every key, so validation errors can point at `file:line: key.path`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from qingzhou.errors import QingzhouError, RecipeError


def read_text(path: str | Path, *, error: type[QingzhouError] = RecipeError) -> str:
    """The file as text; a file that is not UTF-8 is a user error naming the line of the bad byte."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise error("expected a file, got a folder.", where=str(path)) from None
    except OSError as e:
        raise error(f"cannot read the file ({e.strerror or type(e).__name__}).", where=str(path)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(f"the file is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}, column {column}).",
                    where=f"{path}:{line}", hint="Save it as UTF-8.") from None


def parse(text: str, source: str, *, error: type[QingzhouError] = RecipeError) -> Any:
    """`yaml.safe_load` with malformed YAML reported as `source:line:column: problem`."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"{mark.line + 1}:{mark.column + 1}" if mark else "?"
        context = e.context or ""
        if context and e.context_mark is not None and e.context_mark is not mark:
            context += f" started at line {e.context_mark.line + 1}"
        raise error(f"malformed YAML: {e.problem or e}" + (f" ({context})" if context else ""),
                    where=f"{source}:{line}") from None
    except yaml.YAMLError as e:
        raise error(f"malformed YAML: {e}", where=source) from None
    except RecursionError:  # absurdly deep nesting
        raise error("malformed YAML: nested too deeply.", where=source) from None
    except ValueError as e:  # unchecked by PyYAML: a "\U..." escape past U+10FFFF, a date like 2024-13-01
        line = _bad_escape_line(text)
        if line:
            raise error("malformed YAML: a \\U escape names no Unicode character (the largest is \\U0010FFFF).",
                        where=f"{source}:{line}") from None
        raise error(f"malformed YAML: a value cannot be read ({e}).", where=source) from None


_ESCAPE = re.compile(r"\\U([0-9A-Fa-f]{8})")


def _bad_escape_line(text: str) -> int | None:
    """The 1-based line of the first `\\UXXXXXXXX` escape beyond U+10FFFF, if any."""
    for m in _ESCAPE.finditer(text):
        if int(m.group(1), 16) > 0x10FFFF:
            return text.count("\n", 0, m.start()) + 1
    return None


def scalar(raw: str) -> Any:
    """A command-line value (`-s KEY=VALUE`, `--set KEY=VALUE`) read as YAML (numbers, booleans,
    lists); text YAML cannot read stays the text, so the schema names the key it does not fit.
    ValueError: what PyYAML leaves unchecked (2024-13-01, "\\U00110000")."""
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError):
        return raw


def load(path: str | Path, *, error: type[QingzhouError] = RecipeError) -> tuple[Any, str]:
    """Read and parse a YAML file: (data, text)."""
    text = read_text(path, error=error)
    return parse(text, str(path), error=error), text


def key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document, e.g. ('stages', 1, 'lr'), to its 1-based line."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if len(lines) > 100_000:  # an alias bomb: stop, lines are only for messages
            return
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, key.value)
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                walk(value, (*path, i))

    try:
        root = yaml.compose(text)
        if root is not None:
            walk(root, ())
    except (yaml.YAMLError, RecursionError, ValueError):
        pass
    return lines


def where(source: str, lines: dict[tuple, int], path: tuple) -> str:
    """`source:line: dotted.key.path` for the deepest part of `path` whose line is known."""
    dotted = ".".join(str(p) for p in path) or "<top level>"
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return f"{source}:{lines[path[:cut]]}: {dotted}"
    return f"{source}: {dotted}"
