"""`qingzhou moefy MODEL OUT --experts 8 --top-k 4 --router centroid|trained [--eval-text builtin:corpus]`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qingzhou.cli.common import (AllowPickleOpt, StrictOpt, TrustRemoteCodeOpt, check_device, check_out_dir, guarded,
                                 kv_table, load_options, out, print_json, table)


def register(app: typer.Typer) -> None:
    @app.command("moefy")
    @guarded
    def moefy_cmd(
        model: str = typer.Argument(..., help="alias (smollm2), HF folder, .gguf file or hub id"),
        out_dir: Path = typer.Argument(..., help="where to write the moefied model"),
        experts: int = typer.Option(8, "--experts", help="k: experts per FFN"),
        top_k: int = typer.Option(4, "--top-k", help="e: experts run per token (FFN compute kept = e/k)"),
        router: str = typer.Option("centroid", "--router", help="centroid | trained"),
        cluster_on: str = typer.Option("activations", "--cluster-on", help="activations | weights"),
        calibration: str = typer.Option("builtin:calib", "--calibration", help="builtin:calib or a .jsonl/.json/.txt"),
        num_samples: int = typer.Option(128, "--num-samples"),
        seq_len: int = typer.Option(512, "--seq-len"),
        eval_text: Optional[str] = typer.Option(None, "--eval-text", help="also measure perplexity for e = k, k/2, k/4 "
                                                                          "on this text (builtin:corpus, a file ...)"),
        eval_windows: int = typer.Option(8, "--eval-windows"),
        eval_seq_len: int = typer.Option(512, "--eval-seq-len"),
        device: Optional[str] = typer.Option(None, "--device"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it is a folder qingzhou wrote"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Split every FFN of MODEL into experts with a router; save it (dense weights + moefication.json)."""
        from qingzhou.cli.flags import CALIBRATION_FLAGS, validate_flags
        from qingzhou.compress.moefy.config import MoefyConfig

        cfg: dict = {"num_experts": experts, "top_k": top_k, "router": router, "cluster_on": cluster_on,
                     "device": device,
                     "calibration": {"source": calibration, "num_samples": num_samples, "seq_len": seq_len}}
        if eval_text:
            cfg["evaluate"] = {"text": eval_text, "max_windows": eval_windows, "seq_len": eval_seq_len}
        settings = validate_flags(MoefyConfig.model_validate, cfg, {**_FLAGS, **CALIBRATION_FLAGS}, "moefy")

        from qingzhou.compress.moefy import moefy
        from qingzhou.io import check_output_dir
        from qingzhou.llm import load_model

        check_device(settings.device)
        check_out_dir(out_dir, "OUT_DIR")
        check_output_dir(out_dir, force)  # before minutes of loading and clustering
        m, tok = load_model(model, dtype="float32", device="cpu", **load_options(allow_pickle, trust_remote_code, strict))
        report = moefy(m, settings, tokenizer=tok, output_dir=out_dir, overwrite=force)
        summary = {**report.summary(), "out_dir": str(out_dir)}
        if as_json:
            print_json({**summary, "quality": report.quality})
            return
        out.print(kv_table(f"moefy k={experts} e={top_k}", summary))
        if report.quality:
            out.print(table("perplexity vs FFN compute kept", report.quality))


_FLAGS = {"num_experts": "--experts", "top_k": "--top-k", "router": "--router", "cluster_on": "--cluster-on",
          "device": "--device", "evaluate.text": "--eval-text", "evaluate.max_windows": "--eval-windows",
          "evaluate.seq_len": "--eval-seq-len"}
