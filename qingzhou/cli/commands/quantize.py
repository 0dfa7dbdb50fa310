"""`qingzhou quantize MODEL OUT --method gptq --bits 4 --group-size 64`: quantise and save.

The method flags (--bits, --group-size, --sym, ...) are generated from the quantizer configs, so
their defaults are the configs' own; method-specific settings without a flag go through `-s`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from qingzhou.cli.common import (ActivationsOpt, AllowPickleOpt, StreamingOpt, StrictOpt, TrustRemoteCodeOpt,
                                 check_device, check_out_dir, guarded, kv_table, load_options, out, print_json)
from qingzhou.cli.config_options import calibration_help, config_options, method_config, parse_sets
from qingzhou.compress.quantize.config import CalibratedConfig
from qingzhou.recipes.stages.quantize import QuantizeStage

CALIBRATION_HELP = calibration_help()


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    @guarded
    @config_options(CalibratedConfig, exclude={"method", "overrides", "calibration", "pack"},
                    names={"sym": "--sym/--asym"})
    def quantize_cmd(
        model: str = typer.Argument(..., help="alias (smollm2), HF folder, .gguf file or hub id"),
        out_dir: Path = typer.Argument(..., help="where to write the quantised model"),
        method: str = typer.Option(QuantizeStage.default_method, "--method", help="a registered quantizer: rtn | gptq | awq | "
                                                            "smoothquant | ... | none (with --gguf-type)"),
        calibration: Optional[str] = typer.Option(None, "--calibration", help=CALIBRATION_HELP["calibration"]),
        num_samples: Optional[int] = typer.Option(None, "--num-samples", help=CALIBRATION_HELP["num_samples"]),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help=CALIBRATION_HELP["seq_len"]),
        dense: bool = typer.Option(False, "--dense", help="save fake-quantised dense weights instead of GPTQ layout"),
        gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="write OUT/model.gguf (f32|f16|bf16|q8_0|q4_0|"
                                                "q2_k|q3_k_m|q4_k_m|q5_k_m|q6_k) instead of a GPTQ folder; --method none = export only"),
        compressed_tensors: bool = typer.Option(False, "--compressed-tensors", help="save in the compressed-tensors "
                                                "layout (llm-compressor's, vLLM's preferred) instead of GPTQ"),
        sets: list[str] = typer.Option([], "--set", "-s", help="other method settings: -s damp_percent=0.05"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it is a folder qingzhou wrote"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        streaming: bool = StreamingOpt,
        activations: str = ActivationsOpt,
        as_json: bool = typer.Option(False, "--json"),
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Quantise the decoder linears of MODEL and save a GPTQ-layout (or dense, or GGUF) folder."""
        from qingzhou.compress.quantize import QUANTIZERS, quantize
        from qingzhou.compress.quantize.api import save_compressed
        from qingzhou.llm import load_model

        flags = {**(settings or {}), **parse_sets(sets), **({"pack": False} if dense else {})}
        if gguf_type is not None:
            _check_gguf_type(gguf_type)
        if method != "none":
            cfg = method_config(QUANTIZERS, method, flags, {"source": calibration, "num_samples": num_samples, "seq_len": seq_len},
                                names={"pack": "--dense", "sym": "--sym/--asym"}, where="quantize")
        save_format = ("gguf" if gguf_type is not None else "dense" if dense else
                       "compressed-tensors" if compressed_tensors else "gptq")
        check_device(getattr(cfg, "device", None) if method != "none" else None)
        check_out_dir(out_dir, "OUT_DIR", force)  # before minutes of loading and calibration
        if streaming and (method == "none" or gguf_type is not None):
            from qingzhou.errors import RecipeError

            raise RecipeError("--streaming writes a safetensors folder (GPTQ layout or --dense), not GGUF.",
                              where="--streaming", hint="Quantise with --streaming, then export the result.")
        if streaming:  # MODEL is read layer by layer from its folder, never loaded whole
            report = quantize(model, cfg, output_dir=out_dir, overwrite=force, save_format=save_format,
                              streaming=True, activations=activations)
            summary: dict[str, Any] = report.summary()
        else:
            m, tok = load_model(model, dtype="float32", device="cpu", **load_options(allow_pickle, trust_remote_code, strict))
            if method == "none":
                summary = {}
                save_compressed(m, tok, out_dir, "gguf", gguf_type or "q8_0", overwrite=force)
            else:
                report = quantize(m, cfg, tokenizer=tok, output_dir=out_dir, overwrite=force, save_format=save_format,
                                  gguf_type=gguf_type or "q8_0")
                summary = report.summary()
        if gguf_type is not None:
            gguf = out_dir / "model.gguf"
            summary.update(gguf_type=gguf_type, gguf_mb=round(gguf.stat().st_size / 2**20, 3), out=str(gguf))
        else:
            summary["out_dir"] = str(out_dir)
        fallbacks = report.group_size_fallbacks() if method != "none" else {}
        if as_json:
            print_json({**summary, "group_size_fallback_modules": fallbacks})
            return
        out.print(kv_table(f"quantize {method}" + (" -> gguf" if gguf_type else ""), summary))
        if fallbacks:
            used = sorted(set(fallbacks.values()), reverse=True)
            out.print(f"{len(fallbacks)} layers whose width group size {report.config['group_size']} does not divide "
                      f"use group size {' / '.join(map(str, used))} (-1 = per channel); each is listed in "
                      "quantization_config.dynamic (on_indivisible_group: fallback).", highlight=False)


def _check_gguf_type(gguf_type: str) -> None:
    from typing import get_args

    from qingzhou.errors import RecipeError
    from qingzhou.recipes.stages.quantize import QuantizeStage

    choices = get_args(QuantizeStage.model_fields["gguf_type"].annotation)
    if gguf_type not in choices:
        raise RecipeError(f"unknown GGUF type {gguf_type!r}.", where="--gguf-type",
                          hint=f"Use one of {', '.join(choices)}.")
