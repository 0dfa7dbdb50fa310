"""`qingzhou prune MODEL OUT --method wanda --sparsity 0.5 | --nm 2:4 | --method structured ...`.

The method flags (--sparsity, --nm, --heads, ...) are generated from the pruner configs, so their
defaults are the configs' own; settings without a flag go through `-s`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from qingzhou.cli.common import (ActivationsOpt, AllowPickleOpt, StreamingOpt, StrictOpt, TrustRemoteCodeOpt,
                                 check_device, check_out_dir, guarded, kv_table, load_options, out, print_json, table)
from qingzhou.cli.config_options import calibration_help, config_options, method_config, parse_sets
from qingzhou.compress.prune.config import CalibratedPruneConfig
from qingzhou.compress.prune.structured import StructuredConfig
from qingzhou.recipes.stages.prune import PruneStage

CALIBRATION_HELP = calibration_help()


def register(app: typer.Typer) -> None:
    @app.command("prune")
    @guarded
    @config_options(CalibratedPruneConfig, StructuredConfig,
                    exclude={"method", "overrides", "calibration", "owl", "skip"})
    def prune_cmd(
        model: str = typer.Argument(..., help="alias (smollm2), HF folder, .gguf file or hub id"),
        out_dir: Path = typer.Argument(..., help="where to write the pruned model"),
        method: str = typer.Option(PruneStage.default_method, "--method", help="a registered pruner: magnitude | wanda | sparsegpt | "
                                                             "structured | ..."),
        owl: bool = typer.Option(False, "--owl", help="outlier-weighted per-layer sparsity (unstructured)"),
        skip: list[str] = typer.Option([], "--skip", help="regex of module names left dense (repeatable)"),
        calibration: Optional[str] = typer.Option(None, "--calibration", help=CALIBRATION_HELP["calibration"]),
        num_samples: Optional[int] = typer.Option(None, "--num-samples", help=CALIBRATION_HELP["num_samples"]),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help=CALIBRATION_HELP["seq_len"]),
        sets: list[str] = typer.Option([], "--set", "-s", help="other method settings: -s comparison=row"),
        per_layer: bool = typer.Option(False, "--per-layer", help="also print the sparsity of every layer"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it is a folder qingzhou wrote"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        streaming: bool = StreamingOpt,
        activations: str = ActivationsOpt,
        as_json: bool = typer.Option(False, "--json"),
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Prune MODEL and save a plain transformers folder (zeros in place, or smaller if structured)."""
        from qingzhou.compress.prune import PRUNERS, prune
        from qingzhou.llm import load_model

        flags = {**(settings or {}), **parse_sets(sets), **({"owl": {}} if owl else {}),
                 **({"skip": ["lm_head", "embed", *skip]} if skip else {})}
        cfg = method_config(PRUNERS, method, flags, {"source": calibration, "num_samples": num_samples, "seq_len": seq_len},
                            names={"owl": "--owl"}, where="prune")
        check_device(getattr(cfg, "device", None))
        check_out_dir(out_dir, "OUT_DIR", force)  # before minutes of loading and calibration
        if streaming:
            report = prune(model, cfg, output_dir=out_dir, overwrite=force, streaming=True, activations=activations)
        else:
            m, tok = load_model(model, dtype="float32", device="cpu", **load_options(allow_pickle, trust_remote_code, strict))
            report = prune(m, cfg, tokenizer=tok, output_dir=out_dir, overwrite=force)
        summary = {**report.summary(), "out_dir": str(out_dir)}
        if as_json:
            print_json(report.to_dict() if per_layer else summary)
            return
        out.print(kv_table(f"prune {method}", summary))
        if per_layer and getattr(report, "layers", None):
            out.print(table("sparsity per layer", report.layers))
