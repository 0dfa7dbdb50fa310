"""`qingzhou quantize MODEL OUT --method gptq --bits 4 --group-size 64`: quantise and save."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qingzhou.cli.common import (
    AllowPickleOpt,
    StrictOpt,
    TrustRemoteCodeOpt,
    check_device,
    check_out_dir,
    guarded,
    kv_table,
    load_options,
    out,
    print_json,
)


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    @guarded
    def quantize_cmd(
        model: str = typer.Argument(..., help="alias (smollm2), HF folder, .gguf file or hub id"),
        out_dir: Path = typer.Argument(..., help="where to write the quantised model"),
        method: str = typer.Option("gptq", "--method", help="rtn | gptq | awq | smoothquant | none (with --gguf-type)"),
        bits: int = typer.Option(4, "--bits"),
        group_size: int = typer.Option(128, "--group-size", help="-1 = per output channel"),
        sym: bool = typer.Option(False, "--sym/--asym"),
        calibration: str = typer.Option("builtin:calib", "--calibration", help="builtin:calib or a .jsonl/.json/.txt"),
        num_samples: int = typer.Option(128, "--num-samples"),
        seq_len: int = typer.Option(512, "--seq-len"),
        skip: list[str] = typer.Option([], "--skip", help="regex of module names to keep in full precision"),
        on_indivisible_group: str = typer.Option("error", "--on-indivisible-group", help="error | per_channel | ragged"),
        dense: bool = typer.Option(False, "--dense", help="save fake-quantised dense weights instead of GPTQ layout"),
        gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="write OUT/model.gguf (f32|f16|q8_0|q4_0) "
                                                "instead of a GPTQ folder; --method none = export only"),
        device: Optional[str] = typer.Option(None, "--device"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Quantise the decoder linears of MODEL and save a GPTQ-layout (or dense) folder."""
        from qingzhou.compress.quantize import quantize, save_quantized
        from qingzhou.llm import load_model

        cfg = {"method": method, "bits": bits, "group_size": group_size, "sym": sym, "skip": skip,
               "on_indivisible_group": on_indivisible_group, "pack": not dense}
        if method != "rtn":
            cfg.update(device=device, calibration={"source": calibration, "num_samples": num_samples,
                                                   "seq_len": seq_len})
        check_device(device)
        check_out_dir(out_dir, "OUT_DIR")
        m, tok = load_model(model, dtype="float32", device="cpu", **load_options(allow_pickle, trust_remote_code, strict))
        if gguf_type is not None:
            from qingzhou.compress.quantize.formats.gguf import export_gguf

            summary = {} if method == "none" else quantize(m, cfg, tokenizer=tok).summary()
            info = export_gguf(m, tok, out_dir / "model.gguf", gguf_type)  # type: ignore[arg-type]
            summary.update(gguf_type=gguf_type, gguf_mb=round(info["bytes"] / 2**20, 3), out=info["path"])
            print_json(summary) if as_json else out.print(kv_table(f"quantize {method} -> gguf", summary))
            return
        report = quantize(m, cfg, tokenizer=tok)
        if dense:
            from qingzhou.llm import save_model

            save_model(m, tok, out_dir)
        else:
            save_quantized(m, out_dir, tok)
        summary = {**report.summary(), "out_dir": str(out_dir)}
        if as_json:
            print_json(summary)
        else:
            out.print(kv_table(f"quantize {method}", summary))
