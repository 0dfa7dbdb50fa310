"""The one JSON Lines reader: every .jsonl qingzhou reads (training rows, calibration texts, task
files) goes through it, so a broken line is always reported the same way, as `file:line`."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qingzhou.errors import DataError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield `(line number, parsed value)` for every non-blank line of `path`; a line that is not
    JSON is a `DataError` naming `path:line`."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg}).", where=f"{path}:{lineno}") from None
