"""`qingzhou prune MODEL OUT --method wanda --sparsity 0.5 | --nm 2:4 | --method structured ...`."""
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
    table,
)


def register(app: typer.Typer) -> None:
    @app.command("prune")
    @guarded
    def prune_cmd(
        model: str = typer.Argument(..., help="alias (smollm2), HF folder, .gguf file or hub id"),
        out_dir: Path = typer.Argument(..., help="where to write the pruned model"),
        method: str = typer.Option("wanda", "--method", help="magnitude | wanda | sparsegpt | structured"),
        sparsity: float = typer.Option(0.5, "--sparsity", help="fraction of weights removed (unstructured)"),
        nm: Optional[str] = typer.Option(None, "--nm", help="semi-structured pattern, e.g. 2:4 or 4:8"),
        owl: bool = typer.Option(False, "--owl", help="outlier-weighted per-layer sparsity (unstructured)"),
        skip: list[str] = typer.Option([], "--skip", help="regex of module names left dense (repeatable)"),
        heads: float = typer.Option(0.0, "--heads", help="structured: fraction of KV groups removed"),
        mlp: float = typer.Option(0.0, "--mlp", help="structured: fraction of MLP channels removed"),
        layers: int = typer.Option(0, "--layers", help="structured: number of decoder layers removed"),
        calibration: str = typer.Option("builtin:calib", "--calibration", help="builtin:calib or a .jsonl/.json/.txt"),
        num_samples: int = typer.Option(128, "--num-samples"),
        seq_len: int = typer.Option(512, "--seq-len"),
        device: Optional[str] = typer.Option(None, "--device"),
        per_layer: bool = typer.Option(False, "--per-layer", help="also print the sparsity of every layer"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Prune MODEL and save a plain transformers folder (zeros in place, or smaller if structured)."""
        from qingzhou.compress.prune import prune
        from qingzhou.llm import load_model, save_model

        cfg: dict = {"method": method, "device": device,
                     "calibration": {"source": calibration, "num_samples": num_samples, "seq_len": seq_len}}
        if method == "structured":
            cfg.update(heads=heads, mlp=mlp, layers=layers)
        else:
            cfg.update(sparsity=sparsity, nm=nm, owl={} if owl else None)
            if skip:
                cfg["skip"] = ["lm_head", "embed", *skip]
        check_device(device)
        check_out_dir(out_dir, "OUT_DIR")
        m, tok = load_model(model, dtype="float32", device="cpu", **load_options(allow_pickle, trust_remote_code, strict))
        report = prune(m, cfg, tokenizer=tok)
        save_model(m, tok, out_dir)
        summary = {**report.summary(), "out_dir": str(out_dir)}
        if as_json:
            print_json(report.to_dict() if per_layer else summary)
            return
        out.print(kv_table(f"prune {method}", summary))
        if per_layer and getattr(report, "layers", None):
            out.print(table("sparsity per layer", report.layers))
