"""Plain-text tables shared by reports and comparisons (markdown, as GitHub and notebooks render it)."""
from __future__ import annotations

from typing import Any


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_nothing measured_\n"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    fmt = lambda v: "" if v is None else (f"{v:,.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
