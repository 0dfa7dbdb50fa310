"""`qingzhou eval tasks`: zero/few-shot task accuracy (ARC, HellaSwag, PIQA, ... CMMLU, C-Eval)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qingzhou.cli.common import (AllowPickleOpt, MaxMemoryOpt, OffloadFolderOpt, StrictOpt, TrustRemoteCodeOpt, check_device, check_out_file,
                                 emit_result, guarded, load_options, out, print_json, table)


def register_eval(eval_app: typer.Typer) -> None:
    """Add the `tasks` command to the `qingzhou eval` group."""

    @eval_app.command("tasks")
    @guarded
    def tasks_cmd(
        tasks: list[str] = typer.Argument(None, help="task names (see --list) or task YAML files"),
        model: str = typer.Option("smollm2", "--model", "-m", help="alias, local HF folder, .gguf file or hub id"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N] | npu | mlu | xpu | musa | mps"),
        dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
        num_fewshot: int = typer.Option(0, "--num-fewshot", "-k", help="solved examples in each prompt"),
        limit: Optional[int] = typer.Option(None, "--limit", "-n", help="first N rows per task (per subject)"),
        batch_size: int = typer.Option(8, "--batch-size", "-b"),
        seed: int = typer.Option(0, "--seed", help="seed of the few-shot sampler"),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="folder with tasks/*.jsonl, cmmlu/ ..."),
        source: str = typer.Option("auto", "--source", help="auto | local | hub"),
        out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the result JSON here"),
        force: bool = typer.Option(False, "--force", help="overwrite an existing --out file"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        max_memory: Optional[str] = MaxMemoryOpt,
        offload_folder: Optional[str] = OffloadFolderOpt,
        list_: bool = typer.Option(False, "--list", help="list the shipped tasks and exit"),
        as_json: bool = typer.Option(False, "--json", help="print a JSON object instead of tables"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Score a model on multiple-choice, LAMBADA, generation and corpus tasks (lm-eval prompts)."""
        from qingzhou.eval.tasks import list_tasks, load_task

        if list_ or not tasks:
            rows = [{"task": n, "kind": (s := load_task(n)).kind, "metric": s.headline,
                     "subjects": len(s.subjects or {}) or ""} for n in list_tasks()]
            print_json(rows) if as_json else out.print(table("tasks", rows))
            return
        from qingzhou.eval.harness import evaluate
        from qingzhou.llm import load_model

        for name in tasks:  # a typo fails now, not after loading the model
            load_task(name)
        check_device(device)
        check_out_file(out_file, force=force)
        if data_dir is not None and not data_dir.is_dir():
            from qingzhou.errors import DataError

            raise DataError(f"folder not found: {data_dir}", where="--data-dir")
        mdl, tok = load_model(model, dtype=dtype, device=device, **load_options(allow_pickle, trust_remote_code, strict, max_memory, offload_folder))
        result = evaluate(mdl, tok, tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                          seed=seed, data_dir=data_dir, source=source, progress=progress)
        result["config"]["model"] = model
        if emit_result(result, out_file, as_json):
            return
        rows = [{"task": name, "metric": r["metric"], "score": round(r["score"], 4),
                 "stderr": None if r["stderr"] is None else round(r["stderr"], 4), "n": r["n"],
                 "seconds": r["seconds"]} for name, r in result["results"].items()]
        out.print(table(f"{model}, {num_fewshot}-shot", rows))
