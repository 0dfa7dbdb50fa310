"""Shared CLI plumbing: error printing, --json output, tables. Commands stay a few lines each."""
from __future__ import annotations

import functools
import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from qingzhou.errors import QingzhouError

STATE = {"debug": False}
out = Console()
err = Console(stderr=True)


def guarded(fn):
    """Run a command; print user errors as one paragraph (exit 2), tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QingzhouError as e:
            if STATE["debug"]:
                raise
            err.print(f"[bold red]{e.kind}:[/] {e.render()}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (qingzhou.signals.Interrupted): say how to go on
            from rich.markup import escape

            message = getattr(e, "message", "") or "completed stages are kept; rerun with --resume to continue."
            err.print(f"[yellow]interrupted[/]: {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(e, "exit_code", 130)) from None

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def emit_result(result: dict[str, Any], out_file: Any, as_json: bool) -> bool:
    """Write `result` to `--out` (atomically) if given, print it as JSON with `--json`; True when
    printed, so the command skips its tables."""
    if out_file:
        from qingzhou.io import atomic_write_json

        atomic_write_json(out_file, result)
    if as_json:
        print_json(result)
    return as_json


def table(title: str | None, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Table:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_fmt(r.get(c)) for c in columns])
    return t


def kv_table(title: str | None, data: dict[str, Any]) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in data.items():
        t.add_row(str(k), _fmt(v))
    return t


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)
