"""`qingzhou prune MODEL OUT --method wanda --sparsity 0.5 | --nm 2:4 | --method structured ...`.

Settings left unset take the method config's defaults (as a recipe stage does); the config is
validated, and the calibration file found, before the model loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from qingzhou.cli.common import guarded, kv_table, out, print_json, table
from qingzhou.cli.flags import given


def register(app: typer.Typer) -> None:
    @app.command("prune")
    @guarded
    def prune_cmd(
        model: str = typer.Argument(..., help="alias (smollm2), HF folder, .gguf file or hub id"),
        out_dir: Path = typer.Argument(..., help="where to write the pruned model"),
        method: Optional[str] = typer.Option(None, "--method", help="magnitude | wanda | sparsegpt | structured "
                                             "(default: wanda, as the recipe stage)"),
        sparsity: Optional[float] = typer.Option(None, "--sparsity", help="fraction of weights removed, "
                                                 "unstructured (default: 0.5)"),
        nm: Optional[str] = typer.Option(None, "--nm", help="semi-structured pattern, e.g. 2:4 or 4:8"),
        owl: bool = typer.Option(False, "--owl", help="outlier-weighted per-layer sparsity (unstructured)"),
        skip: list[str] = typer.Option([], "--skip", help="regex of module names left dense (repeatable), "
                                       "besides the config's lm_head and embeddings"),
        heads: Optional[float] = typer.Option(None, "--heads", help="structured: fraction of KV groups removed"),
        mlp: Optional[float] = typer.Option(None, "--mlp", help="structured: fraction of MLP channels removed"),
        layers: Optional[int] = typer.Option(None, "--layers", help="structured: number of decoder layers removed"),
        calibration: Optional[str] = typer.Option(None, "--calibration", help="builtin:calib or a .jsonl/.json/.txt "
                                                  "(default: builtin:calib)"),
        num_samples: Optional[int] = typer.Option(None, "--num-samples", help="calibration samples (default: 128)"),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per calibration sample (default: 512)"),
        device: Optional[str] = typer.Option(None, "--device"),
        per_layer: bool = typer.Option(False, "--per-layer", help="also print the sparsity of every layer"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Prune MODEL and save a plain transformers folder (zeros in place, or smaller if structured)."""
        from qingzhou.recipes.stages.prune import PruneStage

        method = method or PruneStage.default_method
        cfg = {"method": method, **given(sparsity=sparsity, nm=nm, owl={} if owl else None, heads=heads, mlp=mlp,
                                         layers=layers, device=device,
                                         calibration=given(source=calibration, num_samples=num_samples,
                                                           seq_len=seq_len))}
        settings = _validate(cfg, skip)  # every bad setting fails here, before the model loads

        from qingzhou.compress.prune import prune
        from qingzhou.llm import load_model, save_model

        m, tok = load_model(model, dtype="float32", device="cpu")
        report = prune(m, settings, tokenizer=tok)
        save_model(m, tok, out_dir)
        summary = {**report.summary(), "out_dir": str(out_dir)}
        if as_json:
            print_json(report.to_dict() if per_layer else summary)
            return
        out.print(kv_table(f"prune {method}", summary))
        if per_layer and getattr(report, "layers", None):
            out.print(table("sparsity per layer", report.layers))


_FLAGS = {"sparsity": "--sparsity", "nm": "--nm", "owl": "--owl", "skip": "--skip", "heads": "--heads",
          "mlp": "--mlp", "layers": "--layers", "device": "--device"}


def _validate(cfg: dict[str, Any], skip: list[str]) -> Any:
    """The validated pruner config (`--skip` adds to the config's default skip list)."""
    from qingzhou.cli.flags import CALIBRATION_FLAGS, validate_flags
    from qingzhou.compress.prune.registry import load_pruners, parse_config

    spec = load_pruners().get(cfg["method"])
    if skip and spec is not None and "skip" in spec.config.model_fields:
        cfg["skip"] = [*spec.config.model_fields["skip"].get_default(call_default_factory=True), *skip]
    elif skip:
        cfg["skip"] = skip  # a method without `skip` (structured): the config names the flag
    return validate_flags(parse_config, cfg, {**_FLAGS, **CALIBRATION_FLAGS}, f"prune --method {cfg['method']}")
