"""`qingzhou distill STUDENT --teacher TEACHER DATA`: train a (pruned, quantized, smaller) student
towards a teacher on the one fine-tuning loop."""
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
    @app.command("distill")
    @guarded
    def distill_cmd(
        student: str = typer.Argument(..., help="the student: alias, HF folder (e.g. a pruned model), .gguf or hub id"),
        data: str = typer.Argument("builtin:calib", help="training text/rows: file, builtin:NAME or hub id"),
        teacher: str = typer.Option("smollm2", "--teacher", "-t", help="the teacher: alias, HF folder, .gguf or hub id"),
        out_dir: Path = typer.Option(Path("runs/distill"), "--out", "-o", help="output folder (model/ or adapter/)"),
        method: str = typer.Option("full", "--method", help="training method: full (pruned students), lora, ..."),
        max_steps: int = typer.Option(100, "--max-steps"),
        learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="default: the method's"),
        batch_size: int = typer.Option(4, "--batch-size", "-b"),
        divergence: str = typer.Option("forward_kl", "--divergence", help="forward_kl | reverse_kl | js"),
        temperature: float = typer.Option(2.0, "--temperature"),
        kd_ratio: float = typer.Option(0.5, "--kd-ratio", help="weight of the distillation term (rest: cross-entropy)"),
        top_k: Optional[int] = typer.Option(64, "--top-k", help="cache the teacher's top-k logits (0: live teacher)"),
        hidden_weight: float = typer.Option(0.0, "--hidden-weight", help="> 0 adds hidden-state matching"),
        cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="where teacher caches live"),
        max_length: int = typer.Option(512, "--max-length"),
        packing: bool = typer.Option(True, "--packing/--no-packing"),
        data_format: str = typer.Option("auto", "--format", help="auto | text | alpaca | sharegpt | messages"),
        device: str = typer.Option("auto", "--device"),
        seed: int = typer.Option(0, "--seed"),
        resume: bool = typer.Option(True, "--resume/--no-resume"),
        force: bool = typer.Option(False, "--force", help="start over in an --out folder holding an earlier run"),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="also checkpoint every N steps"),
        save_every_minutes: float = typer.Option(10.0, "--save-every-minutes",
                                                 help="checkpoint after this much training time (0: off); Ctrl-C "
                                                      "and SIGTERM save one too"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        sets: list[str] = typer.Option(None, "--set", "-s", help="other training fields, KEY=VALUE (repeatable)"),
        as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    ) -> None:
        """Distil TEACHER into STUDENT on DATA; writes the student, metrics.json and distill.json to --out."""
        from qingzhou.cli.commands.finetune import _parse_sets
        from qingzhou.finetune.distill import distill, parse_distill_config
        from qingzhou.data import DataConfig
        from qingzhou.finetune.checkpoint import checkpoint_root
        from qingzhou.finetune.loop import claim_output_dir
        from qingzhou.llm import load_model

        fields = {"method": method, "max_steps": max_steps, "batch_size": batch_size, "seed": seed,
                  "save_every_minutes": save_every_minutes, **({"save_every": save_every} if save_every else {}),
                  "progress": not as_json, "divergence": divergence, "temperature": temperature,
                  "kd_ratio": kd_ratio, "top_k": top_k or None, "cache_dir": cache_dir,
                  "hidden": {"weight": hidden_weight} if hidden_weight > 0 else None}
        if learning_rate is not None:
            fields["learning_rate"] = learning_rate
        cfg = parse_distill_config({**fields, **_parse_sets(sets)})
        data_cfg = DataConfig(source=data, format=data_format, max_length=max_length, packing=packing, seed=seed)
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
