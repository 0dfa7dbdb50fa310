"""`qingzhou fit MODEL OUT --max-size 80MB | --avg-bits 3.5 | --min-tok-s 40 --device cpu`.

Exactly one budget; every flag (budget, method settings, calibration file, device, OUT) is checked
before the model loads. Calls the same `fit()` a notebook does and prints its summary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from qingzhou.cli.common import (AllowPickleOpt, StrictOpt, TrustRemoteCodeOpt, check_device, check_out_dir, guarded,
                                 kv_table, load_options, out, print_json)
from qingzhou.cli.config_options import calibration_help, config_options, method_config, parse_sets
from qingzhou.compress.quantize.config import CalibratedConfig

CALIBRATION_HELP = calibration_help()


def register(app: typer.Typer) -> None:
    @app.command("fit")
    @guarded
    @config_options(CalibratedConfig, exclude={"method", "overrides", "calibration", "pack", "bits", "group_size",
                                               "device", "on_indivisible_group"},
                    names={"sym": "--sym/--asym"})
    def fit_cmd(
        model: str = typer.Argument(..., help="alias (smollm2), HF folder, .gguf file or hub id"),
        out_dir: Path = typer.Argument(..., help="where to write the fitted model (GPTQ folder + plan.yaml)"),
        max_size: Optional[str] = typer.Option(None, "--max-size", help='budget: model.safetensors at most this '
                                               'size, e.g. 80MB or 75MiB (scales, zeros and header counted)'),
        avg_bits: Optional[float] = typer.Option(None, "--avg-bits", help="budget: average bits per weight of the "
                                                 "fitted linears (scales, zeros, g_idx counted), e.g. 3.5"),
        min_tok_s: Optional[float] = typer.Option(None, "--min-tok-s", help="budget: predicted batch-1 decode "
                                                  "tokens/s on --device (timing table measured once, cached)"),
        device: Optional[str] = typer.Option(None, "--device", help="where to calibrate, and the device a "
                                             "--min-tok-s budget is timed on (default: best available)"),
        method: str = typer.Option("gptq", "--method", help="gptq | rtn: the quantizer measured and applied "
                                   "(rtn calibrates on CPU with the default calibration set)"),
        calibration: Optional[str] = typer.Option(None, "--calibration", help=CALIBRATION_HELP["calibration"]),
        num_samples: Optional[int] = typer.Option(None, "--num-samples", help=CALIBRATION_HELP["num_samples"]),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help=CALIBRATION_HELP["seq_len"]),
        heldout: float = typer.Option(0.1, "--heldout", help="fraction of the calibration samples held out of the "
                                      "measurement for the end-to-end KL check"),
        timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="folder of the speed table "
                                                    "(default ~/.cache/qingzhou/fit)"),
        gguf: bool = typer.Option(False, "--gguf", help="also write OUT/model.gguf: the same plan as llama.cpp "
                                  "per-tensor types (8 -> q8_0, 4 -> q4_k, 3 -> q3_k, 2 -> q2_k, with llama.cpp's "
                                  "fallback for rows not a multiple of 256), from the original weights; Llama, Mistral, "
                                  "Qwen2, Gemma 3"),
        gguf_keep: str = typer.Option("f16", "--gguf-keep", help="GGUF type of kept linears and embeddings: "
                                      "f16 | bf16 | f32"),
        drop_layers: int = typer.Option(0, "--drop-layers", min=0, help="at most this many whole decoder layers "
                                        "may be dropped where that measures better (size and bits budgets); "
                                        "the saved model then has fewer layers"),
        kl_calibrate: int = typer.Option(2, "--kl-calibrate", min=0, help="held-out samples on which each decoder "
                                         "layer's and each kind of linear's end-to-end KL is measured to calibrate "
                                         "the per-linear losses (0: the Fisher-weighted proxy as measured)"),
        sets: list[str] = typer.Option([], "--set", "-s", help="other method settings: -s damp_percent=0.05"),
        force: bool = typer.Option(False, "--force", help="replace OUT if it is a folder qingzhou wrote"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        as_json: bool = typer.Option(False, "--json"),
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Quantise MODEL to a budget with the per-layer plan of least measured damage, and save it."""
        from qingzhou.compress.fit import fit
        from qingzhou.compress.fit.budget import Budget
        from qingzhou.compress.quantize import QUANTIZERS
        from qingzhou.errors import RecipeError
        from qingzhou.llm import load_model

        given = {k: v for k, v in {"--max-size": max_size, "--avg-bits": avg_bits, "--min-tok-s": min_tok_s}.items()
                 if v is not None}
        if len(given) != 1:
            raise RecipeError(f"fit needs exactly one budget, got {', '.join(given) or 'none'}.", where="qingzhou fit",
                              hint="Give one of --max-size 80MB, --avg-bits 3.5 or --min-tok-s 40 (with --device).")
        flag = next(iter(given))
        try:
            budget = Budget(max_size=max_size, avg_bits=avg_bits, min_tok_s=min_tok_s,  # type: ignore[arg-type]
                            device=device if min_tok_s is not None else None)
        except RecipeError as e:
            raise RecipeError(e.message, where=flag, hint=e.hint) from None
        if method not in ("gptq", "rtn"):
            raise RecipeError(f"fit measures and applies gptq or rtn, not {method!r}.", where="--method")
        if not 0 <= heldout < 1:
            raise RecipeError(f"--heldout {heldout} must be in [0, 1).", where="--heldout")
        takes_device = "device" in QUANTIZERS.get(method, where="--method").config.model_fields
        flags = {**(settings or {}), **parse_sets(sets), **({"device": device} if device and takes_device else {})}
        cfg = method_config(QUANTIZERS, method, flags, {"source": calibration, "num_samples": num_samples,
                                                        "seq_len": seq_len},
                            names={"sym": "--sym/--asym", "device": "--device"}, where="fit")
        if drop_layers and min_tok_s is not None:
            raise RecipeError("--drop-layers works with --max-size or --avg-bits, not a speed budget.",
                              where="--drop-layers", hint="Drop it, or give a size or bits budget.")
        if gguf_keep not in ("f16", "bf16", "f32"):
            raise RecipeError(f"--gguf-keep {gguf_keep!r} is not f16, bf16 or f32.", where="--gguf-keep")
        check_device(device)
        check_out_dir(out_dir, "OUT_DIR", force)  # before minutes of loading and calibration
        m, tok = load_model(model, dtype="float32", device="cpu", **load_options(allow_pickle, trust_remote_code, strict))
        report = fit(m, budget, cfg, tokenizer=tok, output_dir=out_dir, overwrite=force, heldout=heldout,
                     timing_cache=timing_cache, load_stage={"model": model, "dtype": "float32"}, gguf=gguf,
                     gguf_keep=gguf_keep, drop_layers=drop_layers, kl_calibrate=kl_calibrate)
        summary = {**report.summary(), "out_dir": str(out_dir), "plan": str(out_dir / "plan.yaml"),
                   **({"gguf": str(out_dir / "model.gguf")} if gguf else {})}
        if as_json:
            print_json(summary)
            return
        summary["mix"] = ", ".join(f"{k} x{v}" for k, v in summary["mix"].items())
        out.print(kv_table(f"fit {budget.describe()}", summary))
