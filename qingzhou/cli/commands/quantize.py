"""`qingzhou quantize MODEL OUT --method gptq --bits 4 --group-size 64`: quantise and save.

Settings left unset take the method config's defaults (`QuantizeConfig` and the method's subclass,
`CalibrationConfig`), so the command and a recipe stage quantise alike; the whole config is
validated, and the calibration file found, before the model loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from qingzhou.cli.common import guarded, kv_table, out, print_json
from qingzhou.cli.flags import given


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    @guarded
    def quantize_cmd(
        model: str = typer.Argument(..., help="alias (smollm2), HF folder, .gguf file or hub id"),
        out_dir: Path = typer.Argument(..., help="where to write the quantised model"),
        method: Optional[str] = typer.Option(None, "--method", help="rtn | gptq | awq | smoothquant | none (with "
                                             "--gguf-type) (default: gptq, as the recipe stage)"),
        bits: Optional[int] = typer.Option(None, "--bits", help="bits per weight (default: the method's; gptq: 4)"),
        group_size: Optional[int] = typer.Option(None, "--group-size", help="input columns per scale, -1 = per "
                                                 "output channel (default: the method's; gptq: 128)"),
        sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="(default: the method's; gptq: asym)"),
        calibration: Optional[str] = typer.Option(None, "--calibration", help="builtin:calib or a .jsonl/.json/.txt "
                                                  "(default: builtin:calib)"),
        num_samples: Optional[int] = typer.Option(None, "--num-samples", help="calibration samples (default: 128)"),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per calibration sample (default: 512)"),
        skip: list[str] = typer.Option([], "--skip", help="regex of module names to keep in full precision"),
        on_indivisible_group: Optional[str] = typer.Option(
            None, "--on-indivisible-group", help="fallback | per_channel | ragged | error: for layers the group size "
                                                 "does not divide (default: fallback, to 64/32 or per-channel)"),
        dense: bool = typer.Option(False, "--dense", help="save fake-quantised dense weights instead of GPTQ layout"),
        gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="write OUT/model.gguf (f32|f16|q8_0|q4_0) "
                                                "instead of a GPTQ folder; --method none = export only"),
        device: Optional[str] = typer.Option(None, "--device"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Quantise the decoder linears of MODEL and save a GPTQ-layout (or dense) folder."""
        from qingzhou.recipes.stages.quantize import QuantizeStage

        method = method or QuantizeStage.default_method
        cfg = {"method": method, **given(bits=bits, group_size=group_size, sym=sym, skip=skip, device=device,
                                         on_indivisible_group=on_indivisible_group, pack=False if dense else None,
                                         calibration=given(source=calibration, num_samples=num_samples,
                                                           seq_len=seq_len))}
        settings = _validate(cfg, gguf_type)  # every bad setting fails here, before the model loads

        from qingzhou.compress.quantize import quantize, save_quantized
        from qingzhou.llm import load_model

        m, tok = load_model(model, dtype="float32", device="cpu")
        if gguf_type is not None:
            from qingzhou.compress.quantize.formats.gguf import export_gguf

            summary = {} if settings is None else quantize(m, settings, tokenizer=tok).summary()
            info = export_gguf(m, tok, out_dir / "model.gguf", gguf_type)  # type: ignore[arg-type]
            summary.update(gguf_type=gguf_type, gguf_mb=round(info["bytes"] / 2**20, 3), out=info["path"])
            print_json(summary) if as_json else out.print(kv_table(f"quantize {method} -> gguf", summary))
            return
        report = quantize(m, settings, tokenizer=tok)
        if dense:
            from qingzhou.llm import save_model

            save_model(m, tok, out_dir)
        else:
            save_quantized(m, out_dir, tok)
        summary = {**report.summary(), "out_dir": str(out_dir)}
        fallbacks = report.group_size_fallbacks()
        if as_json:
            print_json({**summary, "group_size_fallback_modules": fallbacks})
            return
        out.print(kv_table(f"quantize {method}", summary))
        if fallbacks:
            used = sorted(set(fallbacks.values()), reverse=True)
            out.print(f"{len(fallbacks)} layers whose width group size {report.config['group_size']} does not divide "
                      f"use group size {' / '.join(map(str, used))} (-1 = per channel); each is listed in "
                      "quantization_config.dynamic (on_indivisible_group: fallback).", highlight=False)


_FLAGS = {"bits": "--bits", "group_size": "--group-size", "sym": "--sym/--asym", "skip": "--skip",
          "on_indivisible_group": "--on-indivisible-group", "device": "--device", "pack": "--dense"}


def _validate(cfg: dict[str, Any], gguf_type: str | None) -> Any:
    """The validated method config (None for `--method none`), the calibration source resolved,
    and the GGUF type checked: all without torch or the model."""
    from typing import get_args

    from qingzhou.cli.flags import CALIBRATION_FLAGS, validate_flags
    from qingzhou.compress.quantize.config import CalibratedConfig
    from qingzhou.compress.quantize.registry import load_quantizers, parse_config
    from qingzhou.errors import RecipeError
    from qingzhou.recipes.stages.quantize import QuantizeStage

    if gguf_type is not None:
        choices = get_args(QuantizeStage.model_fields["gguf_type"].annotation)
        if gguf_type not in choices:
            raise RecipeError(f"unknown GGUF type {gguf_type!r}.", where="--gguf-type",
                              hint=f"Use one of {', '.join(choices)}.")
        if cfg["method"] == "none":
            return None
    spec = load_quantizers().get(cfg["method"])
    if spec is not None and not issubclass(spec.config, CalibratedConfig):  # rtn: no calibration, no device
        cfg = {k: v for k, v in cfg.items() if k not in ("device", "calibration")}
    return validate_flags(parse_config, cfg, {**_FLAGS, **CALIBRATION_FLAGS}, f"quantize --method {cfg['method']}")
