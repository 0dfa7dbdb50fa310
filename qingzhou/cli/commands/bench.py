"""`qingzhou bench`: prefill/decode speed, latency and memory of a model on this machine."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qingzhou.cli.common import (AllowPickleOpt, MaxMemoryOpt, OffloadFolderOpt, StrictOpt, TrustRemoteCodeOpt, check_device, check_out_file,
                                 emit_result, guarded, kv_table, load_options, out, table)


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @guarded
    def bench_cmd(
        model: str = typer.Option("smollm2", "--model", "-m", help="alias, local HF folder, .gguf file or hub id"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N] | npu | mlu | xpu | musa | mps"),
        dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16"),
        batch_sizes: list[int] = typer.Option([1, 8], "--batch-size", "-b", min=1, help="repeat for several"),
        prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=1),
        new_tokens: int = typer.Option(32, "--new-tokens", min=2),
        warmup: int = typer.Option(1, "--warmup", min=0),
        repeats: int = typer.Option(3, "--repeats", min=1),
        fast: str = typer.Option("auto", "--fast", help="static-cache + compiled decode: auto (CUDA only) | on | off"),
        out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the result JSON here"),
        force: bool = typer.Option(False, "--force", help="overwrite an existing --out file"),
        allow_pickle: bool = AllowPickleOpt,
        trust_remote_code: bool = TrustRemoteCodeOpt,
        strict: bool = StrictOpt,
        max_memory: Optional[str] = MaxMemoryOpt,
        offload_folder: Optional[str] = OffloadFolderOpt,
        as_json: bool = typer.Option(False, "--json", help="print a JSON object instead of tables"),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Measure prefill and decode tokens/s, TTFT, TPOT and memory (mean ± std over repeats)."""
        from qingzhou.errors import RecipeError
        from qingzhou.eval.bench import bench
        from qingzhou.llm import load_model

        choices = {"auto": "auto", "on": True, "off": False}
        if fast not in choices:
            raise RecipeError(f"--fast {fast!r} is not one of auto, on, off.", where="--fast")
        check_device(device)
        check_out_file(out_file, force=force)  # before the model loads
        mdl, tok = load_model(model, dtype=dtype, device=device, **load_options(allow_pickle, trust_remote_code, strict, max_memory, offload_folder))
        result = bench(mdl, tok, batch_sizes=batch_sizes, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                       warmup=warmup, repeats=repeats, progress=progress, fast=choices[fast])
        result["config"]["model"] = model
        if emit_result(result, out_file, as_json):
            return

        def fmt(s):
            return f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["std"] is not None else "")

        rows = [{"batch": r["batch_size"], "prefill tok/s": fmt(r["prefill_tokens_per_s"]),
                 "decode tok/s": fmt(r["decode_tokens_per_s"]), "TTFT ms": fmt(r["ttft_ms"]),
                 "TPOT ms": fmt(r["tpot_ms"])} for r in result["results"]]
        env = result["env"]
        out.print(table(f"{model} on {env['device']} ({env['device_name']}), {result['config']['dtype']}, "
                        f"decode path: {result['config']['decode_path']}", rows))
        out.print(kv_table("memory / roofline", {**result["memory"], **result.get("roofline", {})}))
