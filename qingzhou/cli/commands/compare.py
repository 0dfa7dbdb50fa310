"""`qingzhou compare RUN_DIR...`: one table over runs (from any machine), deltas against the first."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qingzhou.cli.common import guarded, out, print_json, table


def register(app: typer.Typer) -> None:
    @app.command("compare")
    @guarded
    def compare_cmd(
        run_dirs: list[Path] = typer.Argument(..., help="run directories (or run.json files); the first eval is the baseline"),
        out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="write compare.md, compare.json and plots/*.png here"),
        as_json: bool = typer.Option(False, "--json", help="print a JSON object instead of the table"),
        force: bool = typer.Option(False, "--force", help="write into an --out folder an earlier compare wrote"),
    ) -> None:
        """Compare models across runs: size, perplexity, task scores, speed, memory, device."""
        from qingzhou.eval.compare import compare
        from qingzhou.io import check_output_dir, write_marker

        if out_dir is not None:
            check_output_dir(out_dir, force)
        result = compare(run_dirs, out=out_dir)
        if out_dir is not None:
            write_marker(out_dir, "compare")
        if as_json:
            print_json(result.to_dict())
            return
        base = result.baseline
        shared = {c: result.constant(c) for c in ("run", "device") if result.constant(c) is not None}
        columns = [c for c in result.columns() if c not in shared]
        title = f"compare (baseline: {base['run']} / {base['stage']}; deltas in parentheses)"
        title += "".join(f"; {c}: {v}" for c, v in shared.items())
        out.print(table(title, result.display_rows(columns)))
        for name, path in result.files.items():
            out.print(f"{name}: {path}", markup=False, highlight=False)
