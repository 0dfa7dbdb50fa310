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
    tasks: list[str] = Field(default_factory=list, description="task names (qingzhou eval tasks --list) or task YAML paths")
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, gt=0, description="first N rows per task (per subject for suites)")
    batch_size: int = Field(8, gt=0)
    data_dir: str | None = Field(None, description="folder with the task files (default: ../shared/data layout)")


@register_stage("eval", EvalStage)
def run_eval(cfg: EvalStage, ctx: StageContext) -> StageResult:
    """Evaluate the current model: perplexity on a corpus and zero/few-shot task scores."""
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
    if cfg.tasks:
        from qingzhou.eval.harness import evaluate

        out = evaluate(model, tokenizer, cfg.tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit, batch_size=cfg.batch_size, seed=ctx.seed, data_dir=cfg.data_dir)
        metrics["tasks"] = {name: {k: r.get(k) for k in ("metric", "score", "stderr", "n", "seconds", "num_fewshot")} for name, r in out["results"].items()}
        atomic_write_json(ctx.work_dir / "tasks.json", out)
    atomic_write_json(ctx.work_dir / "metrics.json", metrics)
    return StageResult(metrics=metrics, data_hashes=hashes)
