"""`qingzhou export merge`: fold a LoRA/DoRA/IA3 adapter into its base model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qingzhou.cli.common import (AllowPickleOpt, StrictOpt, TrustRemoteCodeOpt, check_out_dir, guarded, kv_table,
                                 load_options, out, print_json)


def register(app: typer.Typer) -> None:
    export_app = typer.Typer(help="Export fine-tuned artifacts.", no_args_is_help=True)
    app.add_typer(export_app, name="export")

    @export_app.command("merge")
    @guarded
    def merge_cmd(
        adapter: Path = typer.Argument(..., help="peft adapter folder (e.g. runs/finetune/adapter)"),
        out_dir: Path = typer.Argument(..., help="where to write the merged model"),
        base: Optional[str] = typer.Option(None, "--base", help="base model (default: the one recorded in the adapter)"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it is a folder qingzhou wrote"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Merge an adapter into its base and save a plain transformers model (prompt adapters are copied)."""
        from qingzhou.finetune import export_merged

        check_out_dir(out_dir, "OUT_DIR", force)
        result = export_merged(adapter, out_dir, base_model=base, overwrite=force, **load_options(allow_pickle, trust_remote_code, strict))
        if as_json:
            print_json(result.to_dict())
        else:
            out.print(kv_table("export merge", result.to_dict()))
