"""`qingzhou finetune`: adapt a model on a data set (full, LoRA family, QLoRA, IA3, prompt-based)."""
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


def _parse_sets(items: list[str]) -> dict:
    """`--set key=value` pairs for method fields without a flag (value parsed as YAML: 8, 0.1, [q_proj])."""
    import yaml

    from qingzhou.errors import RecipeError

    parsed = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"bad --set '{item}'.", hint="Expected KEY=VALUE, e.g. --set dropout=0.1.")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @guarded
    def finetune_cmd(
        data: str = typer.Argument("builtin:industry-qa", help="file (.json/.jsonl/.csv/.parquet/.txt), builtin:NAME or hub id"),
        model: str = typer.Option("smollm2", "--model", "-m", help="alias, local HF folder, .gguf file or hub id"),
        method: str = typer.Option("lora", "--method", help="full | lora | dora | rslora | qlora | ia3 | prompt_tuning | prefix_tuning | p_tuning"),
        out_dir: Path = typer.Option(Path("runs/finetune"), "--out", "-o", help="output folder (adapter/ or model/, checkpoints/)"),
        max_steps: int = typer.Option(100, "--max-steps"),
        learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="default: the method's"),
        batch_size: int = typer.Option(4, "--batch-size", "-b"),
        grad_accum: int = typer.Option(1, "--grad-accum"),
        r: Optional[int] = typer.Option(None, "--r", help="LoRA rank"),
        optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw | sgd | adamw_8bit | paged_adamw_8bit | "
                                                "paged_adamw_32bit | lion_8bit | paged_lion_8bit (8-bit: bitsandbytes)"),
        max_length: int = typer.Option(512, "--max-length"),
        packing: bool = typer.Option(False, "--packing/--no-packing"),
        data_format: str = typer.Option("auto", "--format", help="auto | alpaca | sharegpt | messages | text"),
        template: Optional[str] = typer.Option(None, "--template", help="chat template: name, .jinja file or Jinja text"),
        skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="count and skip rows missing a field"),
        eval_fraction: float = typer.Option(0.05, "--eval-fraction"),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="also checkpoint every N steps"),
        save_every_minutes: float = typer.Option(10.0, "--save-every-minutes",
                                                 help="checkpoint after this much training time (0: off); Ctrl-C "
                                                      "and SIGTERM save one too"),
        gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
        mixed_precision: str = typer.Option("auto", "--mixed-precision", help="auto | no | bf16 | fp16"),
        device: str = typer.Option("auto", "--device"),
        seed: int = typer.Option(0, "--seed"),
        resume: bool = typer.Option(True, "--resume/--no-resume"),
        force: bool = typer.Option(False, "--force", help="start over in an --out folder holding an earlier fine-tune"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        sets: list[str] = typer.Option(None, "--set", "-s", help="other method fields, KEY=VALUE (repeatable)"),
        as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    ) -> None:
        """Fine-tune a model; writes a peft adapter (or full model) and metrics.json to --out."""
        from qingzhou.data import DataConfig
        from qingzhou.finetune import finetune, parse_finetune_config
        from qingzhou.finetune.checkpoint import checkpoint_root
        from qingzhou.finetune.loop import claim_output_dir
        from qingzhou.llm import load_model

        fields = {"method": method, "max_steps": max_steps, "batch_size": batch_size, "grad_accum": grad_accum,
                  "save_every_minutes": save_every_minutes, "gradient_checkpointing": gradient_checkpointing,
                  "mixed_precision": mixed_precision, "seed": seed, "progress": not as_json}
        if save_every is not None:
            fields["save_every"] = save_every
        if learning_rate is not None:
            fields["learning_rate"] = learning_rate
        if r is not None:
            fields["r"] = r
        if optimizer is not None:
            fields["optimizer"] = optimizer
        cfg = parse_finetune_config({**fields, **_parse_sets(sets)})
        data_cfg = DataConfig(source=data, format=data_format, template=template, max_length=max_length, packing=packing,
                              skip_bad_rows=skip_bad_rows, eval_fraction=eval_fraction, seed=seed)
        check_device(device)
        check_out_dir(out_dir, "--out")
        claim_output_dir(out_dir, checkpoint_root(out_dir), resume=resume, overwrite=force)  # before the model loads
        mdl, tok = load_model(model, device=device, **load_options(allow_pickle, trust_remote_code, strict))
        result = finetune(mdl, tok, data_cfg, cfg, output_dir=out_dir, resume=resume, base_source=model, overwrite=force)
        summary = result.to_dict()
        if as_json:
            print_json(summary)
            return
        keys = ["method", "artifact_dir", "steps", "eval_loss_before", "eval_loss_after", "tokens_per_s",
                "peak_memory_mb", "trainable_params", "seconds", "resumed_from"]
        out.print(kv_table(f"finetune {method} on {data}", {k: summary[k] for k in keys}))
