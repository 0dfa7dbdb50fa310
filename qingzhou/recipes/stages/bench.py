"""`kind: bench`: speed and memory of the current model (prefill / decode tokens/s, TTFT, peak memory).

Its batch-1 decode speed and peak memory are what `qingzhou compare` and the report put next to the
eval scores of the same model.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage


class BenchStage(StageConfig):
    kind: Literal["bench"] = "bench"
    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1)
    prompt_tokens: int = Field(128, ge=1)
    new_tokens: int = Field(32, ge=2)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)
    fast: bool | Literal["auto"] = Field("auto", description="static-cache + compiled decode (auto: CUDA only)")
    measure_bandwidth: bool = True
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="benchmark a copy cast to this dtype (the run's model is left as it is): e.g. bfloat16 "
                          "on CPU, where torch's int4 kernel is fast and fp32 4-bit layers dequantise every step")


@register_stage("bench", BenchStage)
def run_bench(cfg: BenchStage, ctx: StageContext) -> StageResult:
    """Benchmark the current model; bench.json holds every number, metrics the headline ones."""
    from qingzhou.eval.bench import bench
    from qingzhou.io import atomic_write_json

    model, tokenizer = ctx.get_model()
    if cfg.dtype is not None:
        import copy

        import torch

        model = copy.deepcopy(model).to(getattr(torch, cfg.dtype))
    out = bench(model, tokenizer, batch_sizes=cfg.batch_sizes, prompt_tokens=cfg.prompt_tokens,
                new_tokens=cfg.new_tokens, warmup=cfg.warmup, repeats=cfg.repeats, fast=cfg.fast,
                measure_bandwidth=cfg.measure_bandwidth, seed=ctx.seed,
                model_path=ctx.model_ref.source if ctx.model_ref else None)
    atomic_write_json(ctx.work_dir / "bench.json", out)
    first = out["results"][0]
    memory = out["memory"]
    metrics = {
        "batch_size": first["batch_size"],
        "decode_tokens_per_s": round(first["decode_tokens_per_s"]["mean"], 2),
        "prefill_tokens_per_s": round(first["prefill_tokens_per_s"]["mean"], 2),
        "ttft_ms": round(first["ttft_ms"]["mean"], 2),
        "peak_memory_gib": memory.get("peak_device_gib", memory.get("peak_rss_gib")),
        "weights_gib": memory["weights_gib"],
        "decode_path": out["config"]["decode_path"],
        "device": out["env"]["device"],
    }
    return StageResult(metrics=metrics)
