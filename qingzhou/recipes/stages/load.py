"""`kind: load`: choose the model every later stage starts from."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from qingzhou.recipes.context import ModelRef, StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage


class LoadStage(StageConfig):
    kind: Literal["load"] = "load"
    model: str = Field("smollm2", description="registry alias, local HF folder, .gguf file or hub id")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    device: str = Field("auto", description="auto | cpu | cuda[:N] | npu | mlu | xpu | musa | mps")
    trust_remote_code: bool = False
    allow_pickle: bool = False
    strict: bool = Field(True, description="refuse weights that do not match config.json (missing, unexpected or mis-shaped tensors)")
    max_memory: str | None = Field(None, description="memory budget, e.g. 6GiB (compute device) or cuda:0=6GiB,cpu=12GiB: "
                                   "the model is placed from its shards and layers that do not fit stream from disk")
    offload_folder: str | None = Field(None, description="where streamed 4-bit layers' kernel layout is cached (default: under $QINGZHOU_CACHE/offload)")


@register_stage("load", LoadStage)
def run_load(cfg: LoadStage, ctx: StageContext) -> StageResult:
    """Load a model (alias, folder, GGUF or hub id) and make it the current model."""
    from qingzhou.llm import describe_model, resolve_source

    source = resolve_source(cfg.model, allow_pickle=cfg.allow_pickle)
    ref = ModelRef(str(cfg.model), cfg.dtype, cfg.device, cfg.trust_remote_code, cfg.allow_pickle, cfg.strict,
                   cfg.max_memory, cfg.offload_folder)
    model, tokenizer = ctx.cache.get(ref)
    ctx.set_model(ref, model, tokenizer)
    return StageResult(metrics=describe_model(model), data_hashes=source.hashes())
