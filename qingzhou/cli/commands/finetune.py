"""`qingzhou finetune`: adapt a model on a data set (full, LoRA family, QLoRA, IA3, prompt-based)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from qingzhou.cli.config_options import config_options, parse_sets
from qingzhou.cli.common import (AllowPickleOpt, StrictOpt, TrustRemoteCodeOpt, check_device, check_out_dir, guarded,
                                 kv_table, load_options, out, print_json)


def method_configs() -> list[type]:
    """FinetuneConfig first, then every registered method's config: their fields become flags."""
    from qingzhou.finetune.config import FinetuneConfig
    from qingzhou.finetune.methods import METHODS

    return [FinetuneConfig, *METHODS.configs().values()]


def register(app: typer.Typer) -> None:
    from qingzhou.data.prepare import DataConfig

    @app.command("finetune")
    @guarded
    @config_options(*method_configs(), exclude={"method", "progress"},
                    names={"learning_rate": ("--learning-rate", "--lr"), "batch_size": ("--batch-size", "-b")})
    @config_options(DataConfig, exclude={"source", "seed"}, target="data_settings")
    def finetune_cmd(
        data: str = typer.Argument("builtin:industry-qa", help="file (.json/.jsonl/.csv/.parquet/.txt), builtin:NAME or hub id"),
        model: str = typer.Option("smollm2", "--model", "-m", help="alias, local HF folder, .gguf file or hub id"),
        method: str = typer.Option("lora", "--method", help="a registered method: full | lora | dora | rslora | qlora | "
                                                            "ia3 | prompt_tuning | prefix_tuning | p_tuning | ..."),
        out_dir: Path = typer.Option(Path("runs/finetune"), "--out", "-o", help="output folder (adapter/ or model/, checkpoints/)"),
        device: str = typer.Option("auto", "--device"),
        resume: bool = typer.Option(True, "--resume/--no-resume"),
        force: bool = typer.Option(False, "--force", help="start over in an --out folder holding an earlier fine-tune"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        sets: list[str] = typer.Option(None, "--set", "-s", help="other method fields, KEY=VALUE (repeatable)"),
        as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
        settings: dict[str, Any] | None = None,
        data_settings: dict[str, Any] | None = None,
    ) -> None:
        """Fine-tune a model; writes a peft adapter (or full model) and metrics.json to --out.

        Method flags (--max-steps, --r, --learning-rate ...) and data flags (--max-length,
        --packing, --format ...) come from the method and data configs, with their defaults."""
        from qingzhou.finetune import finetune, parse_finetune_config
        from qingzhou.finetune.checkpoint import checkpoint_root
        from qingzhou.finetune.loop import claim_output_dir
        from qingzhou.finetune.sharding import leave_process_group
        from qingzhou.llm import load_model

        cfg = parse_finetune_config({"method": method, "progress": not as_json, **(settings or {}), **parse_sets(sets)})
        data_cfg = data_config(data, data_settings, cfg.seed)
        check_device(device)
        check_out_dir(out_dir, "--out")
        claim_output_dir(out_dir, checkpoint_root(out_dir), resume=resume, overwrite=force)  # before the model loads
        mdl, tok = load_model(model, device=device, **load_options(allow_pickle, trust_remote_code, strict))
        result = finetune(mdl, tok, data_cfg, cfg, output_dir=out_dir, resume=resume, base_source=model, overwrite=force)
        leave_process_group()  # under `accelerate launch`; nothing otherwise
        if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`: the result once, from the main process
            return
        if as_json:
            print_json(result.to_dict())
            return
        out.print(kv_table(f"finetune {method} on {data}", result.summary()))


def data_config(source: str, flags: dict[str, Any] | None, seed: int) -> Any:
    """The validated DataConfig of the data flags (a bad value names its flag, before any model loads)."""
    from qingzhou.cli.config_options import flag_name
    from qingzhou.cli.config_options import validate_flags
    from qingzhou.data.prepare import DataConfig

    fields = {"source": source, "seed": seed, **(flags or {})}
    return validate_flags(DataConfig.model_validate, fields, {k: flag_name(k) for k in fields}, "data")
