"""`qingzhou preprocess SOURCE... OUT [--vocab-size 8192] [--near-dup-threshold 0.8] ...`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from qingzhou.cli.common import check_out_dir, guarded, kv_table, out, print_json
from qingzhou.cli.config_options import config_options, flag_name
from qingzhou.data.preprocess import PreprocessConfig


def register(app: typer.Typer) -> None:
    @app.command("preprocess")
    @guarded
    @config_options(PreprocessConfig)
    def preprocess_cmd(
        sources: list[str] = typer.Argument(..., help="text files (one document per line), .jsonl/.json/.csv rows, "
                                                      "builtin:<name> or hub data sets"),
        out_dir: Path = typer.Argument(..., help="where to write the tokenizer and token shards"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it is a folder qingzhou wrote"),
        as_json: bool = typer.Option(False, "--json"),
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Clean and de-duplicate raw text (exact + MinHash near duplicates), train a BPE tokenizer on it
        and write memory-mapped token shards for `kind: pretrain`."""
        from qingzhou.cli.config_options import validate_flags

        cfg = validate_flags(PreprocessConfig.model_validate, dict(settings or {}), _FLAGS, "preprocess")
        check_out_dir(out_dir, "OUT_DIR", force)
        from qingzhou.data.preprocess import preprocess

        report = preprocess(sources, out_dir, cfg, overwrite=force)
        if as_json:
            print_json(report.to_dict())
        else:
            out.print(kv_table("preprocess", report.summary()))


_FLAGS = {name: flag_name(name) for name in PreprocessConfig.model_fields}
