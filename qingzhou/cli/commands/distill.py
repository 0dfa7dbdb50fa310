"""`qingzhou distill STUDENT --teacher TEACHER DATA`: train a (pruned, quantized, smaller) student
towards a teacher on the one fine-tuning loop."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from qingzhou.cli.commands.finetune import data_config, method_configs
from qingzhou.cli.config_options import config_options, parse_sets
from qingzhou.recipes.stages.distill import DistillStage
from qingzhou.cli.common import (AllowPickleOpt, StrictOpt, TrustRemoteCodeOpt, check_device, check_out_dir, guarded,
                                 kv_table, load_options, out, print_json)


def register(app: typer.Typer) -> None:
    from qingzhou.finetune.distill.config import DistillConfig

    @app.command("distill")
    @guarded
    @config_options(DistillConfig, *method_configs(), exclude={"method", "progress", "train", "hidden", "top_k"},
                    names={"learning_rate": ("--learning-rate", "--lr"), "batch_size": ("--batch-size", "-b")})
    def distill_cmd(
        student: str = typer.Argument(..., help="the student: alias, HF folder (e.g. a pruned model), .gguf or hub id"),
        data: str = typer.Argument("builtin:calib", help="training text/rows: file, builtin:NAME or hub id"),
        teacher: str = typer.Option("smollm2", "--teacher", "-t", help="the teacher: alias, HF folder, .gguf or hub id"),
        out_dir: Path = typer.Option(Path("runs/distill"), "--out", "-o", help="output folder (model/ or adapter/)"),
        method: str = typer.Option(DistillStage.default_method, "--method",
                                   help="training method: full (pruned students), lora, quant_scales (a quantized student's scales), ..."),
        top_k: Optional[int] = typer.Option(None, "--top-k", help="cache the teacher's top-k logits (0: live teacher) "
                                                                  f"(default: {DistillConfig.model_fields['top_k'].default})"),
        hidden_weight: float = typer.Option(0.0, "--hidden-weight", help="> 0 adds hidden-state matching"),
        max_length: int = typer.Option(512, "--max-length"),
        packing: bool = typer.Option(True, "--packing/--no-packing", help="distillation packs by default"),
        data_format: str = typer.Option("auto", "--format", help="auto | text | alpaca | sharegpt | messages"),
        device: str = typer.Option("auto", "--device"),
        resume: bool = typer.Option(True, "--resume/--no-resume"),
        force: bool = typer.Option(False, "--force", help="start over in an --out folder holding an earlier run"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        sets: list[str] = typer.Option(None, "--set", "-s", help="other training fields, KEY=VALUE (repeatable)"),
        as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Distil TEACHER into STUDENT on DATA; writes the student, metrics.json and distill.json to --out.

        Distillation and training flags (--temperature, --kd-ratio, --max-steps, --learning-rate ...)
        come from DistillConfig and the training method configs, with their defaults."""
        from qingzhou.finetune.checkpoint import checkpoint_root
        from qingzhou.finetune.distill import distill, parse_distill_config
        from qingzhou.finetune.loop import claim_output_dir
        from qingzhou.llm import load_model

        fields: dict[str, Any] = {"method": method, "progress": not as_json, **(settings or {})}
        if top_k is not None:
            fields["top_k"] = top_k or None
        if hidden_weight > 0:
            fields["hidden"] = {"weight": hidden_weight}
        cfg = parse_distill_config({**fields, **parse_sets(sets)})
        data_cfg = data_config(data, {"format": data_format, "max_length": max_length, "packing": packing},
                               cfg.train.seed)
        check_device(device)
        check_out_dir(out_dir, "--out")
        opts = load_options(allow_pickle, trust_remote_code, strict)
        claim_output_dir(out_dir, checkpoint_root(out_dir), resume=resume, overwrite=force)  # before the models load
        s_model, tok = load_model(student, device=device, **opts)
        t_model, _ = load_model(teacher, device=device, **opts)
        report = distill(s_model, t_model, tok, cfg, data_cfg, output_dir=out_dir, resume=resume, base_source=student,
                         overwrite=force)
        if as_json:
            print_json(report.to_dict())
            return
        out.print(kv_table(f"distill {teacher} -> {student}", {**report.summary(),
                                                               "out_dir": report.finetune.artifact_dir}))
