"""One progress-bar helper on rich, so every long loop looks and behaves the same."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(total: int, label: str, *, enabled: bool = True) -> Iterator[Callable[[int, str], None]]:
    """Yield `advance(n=1, status="")`. Drawn on stderr (stdout stays clean for --json)."""
    if not enabled:
        yield lambda n=1, status="": None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(label, total=total, status="")

        def advance(n: int = 1, status: str = "") -> None:
            prog.update(task, advance=n, status=status)

        yield advance
