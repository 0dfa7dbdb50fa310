"""`kind: eval`: measure the current model (perplexity on a corpus; task scores come with the harness)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage


class PerplexitySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field("builtin:corpus", description="builtin:NAME, a text file, or hf:DATASET:SPLIT")
    seq_len: int = Field(2048, gt=1)
    max_windows: int | None = Field(None, gt=0)
    batch_size: int = Field(1, gt=0)


class EvalStage(StageConfig):
    kind: Literal["eval"] = "eval"
    perplexity: PerplexitySpec | None = Field(default_factory=PerplexitySpec)


@register_stage("eval", EvalStage)
def run_eval(cfg: EvalStage, ctx: StageContext) -> StageResult:
    """Evaluate the current model: perplexity on a corpus."""
    from qingzhou.data.corpus import load_text
    from qingzhou.eval.perplexity import perplexity
    from qingzhou.io import atomic_write_json, sha256_text

    from qingzhou.llm import model_size

    model, tokenizer = ctx.get_model()
    metrics: dict = {"size": model_size(model, ctx.model_ref.source if ctx.model_ref else None)}
    hashes: dict = {}
    if cfg.perplexity is not None:
        spec = cfg.perplexity
        text = load_text(spec.data)
        hashes[spec.data] = sha256_text(text)
        res = perplexity(model, tokenizer, text, seq_len=spec.seq_len, max_windows=spec.max_windows, batch_size=spec.batch_size)
        metrics["perplexity"] = {"data": spec.data, **res.to_dict()}
    atomic_write_json(ctx.work_dir / "metrics.json", metrics)
    return StageResult(metrics=metrics, data_hashes=hashes)
