"""`qingzhou moefy MODEL OUT --experts 8 --top-k 4 --router centroid|trained [--eval-text builtin:corpus]`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from qingzhou.cli.common import (AllowPickleOpt, StrictOpt, TrustRemoteCodeOpt, check_device, check_out_dir, guarded,
                                 kv_table, load_options, out, print_json, table)
from qingzhou.cli.config_options import calibration_help, config_options, flag_name
from qingzhou.compress.moefy.config import MoefyConfig, MoefyEvalConfig

CALIBRATION_HELP = calibration_help()
EVAL = MoefyEvalConfig.model_fields


def register(app: typer.Typer) -> None:
    @app.command("moefy")
    @guarded
    @config_options(MoefyConfig, exclude={"calibration", "skip", "evaluate"}, names={"num_experts": "--experts"})
    def moefy_cmd(
        model: str = typer.Argument(..., help="alias (smollm2), HF folder, .gguf file or hub id"),
        out_dir: Path = typer.Argument(..., help="where to write the moefied model"),
        calibration: Optional[str] = typer.Option(None, "--calibration", help=CALIBRATION_HELP["calibration"]),
        num_samples: Optional[int] = typer.Option(None, "--num-samples", help=CALIBRATION_HELP["num_samples"]),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help=CALIBRATION_HELP["seq_len"]),
        eval_text: Optional[str] = typer.Option(None, "--eval-text", help="also measure perplexity for e = k, k/2, k/4 "
                                                                          "on this text (builtin:corpus, a file ...)"),
        eval_windows: Optional[int] = typer.Option(None, "--eval-windows",
                                                   help=f"(default: {EVAL['max_windows'].default})"),
        eval_seq_len: Optional[int] = typer.Option(None, "--eval-seq-len",
                                                   help=f"(default: {EVAL['seq_len'].default})"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it is a folder qingzhou wrote"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        as_json: bool = typer.Option(False, "--json"),
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Split every FFN of MODEL into experts with a router; save it (dense weights + moefication.json)."""
        from qingzhou.cli.config_options import CALIBRATION_FLAGS, validate_flags

        cfg: dict[str, Any] = dict(settings or {})
        calib = {"source": calibration, "num_samples": num_samples, "seq_len": seq_len}
        if any(v is not None for v in calib.values()):
            cfg["calibration"] = {k: v for k, v in calib.items() if v is not None}
        if eval_text:
            cfg["evaluate"] = {k: v for k, v in {"text": eval_text, "max_windows": eval_windows,
                                                 "seq_len": eval_seq_len}.items() if v is not None}
        settings = validate_flags(MoefyConfig.model_validate, cfg, {**_FLAGS, **CALIBRATION_FLAGS}, "moefy")

        from qingzhou.compress.moefy import moefy
        from qingzhou.llm import load_model

        check_device(settings.device)
        check_out_dir(out_dir, "OUT_DIR", force)  # before minutes of loading and clustering
        m, tok = load_model(model, dtype="float32", device="cpu", **load_options(allow_pickle, trust_remote_code, strict))
        report = moefy(m, settings, tokenizer=tok, output_dir=out_dir, overwrite=force)
        summary = {**report.summary(), "out_dir": str(out_dir)}
        if as_json:
            print_json({**summary, "quality": report.quality})
            return
        out.print(kv_table(f"moefy k={settings.num_experts} e={settings.top_k}", summary))
        if report.quality:
            out.print(table("perplexity vs FFN compute kept", report.quality))


_FLAGS = {**{name: flag_name(name) for name in MoefyConfig.model_fields}, "num_experts": "--experts",
          "evaluate.text": "--eval-text", "evaluate.max_windows": "--eval-windows", "evaluate.seq_len": "--eval-seq-len"}
