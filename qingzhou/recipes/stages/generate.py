"""`kind: generate`: answer a few prompts with the current model, to see what it says."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage


class GenerateStage(StageConfig):
    kind: Literal["generate"] = "generate"
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.0, ge=0)
    chat: bool | Literal["auto"] = "auto"
    system: str | None = None


@register_stage("generate", GenerateStage)
def run_generate(cfg: GenerateStage, ctx: StageContext) -> StageResult:
    """Generate answers to the configured prompts (greedy unless temperature > 0)."""
    from qingzhou.io import atomic_write_json
    from qingzhou.llm.generate import generate

    model, tokenizer = ctx.get_model()
    samples = [
        generate(model, tokenizer, p, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, chat=cfg.chat, system=cfg.system, seed=ctx.seed).to_dict()
        for p in cfg.prompts
    ]
    atomic_write_json(ctx.work_dir / "samples.json", samples)
    tps = sum(s["new_tokens"] for s in samples) / max(sum(s["seconds"] for s in samples), 1e-9)
    return StageResult(metrics={"samples": [{"prompt": s["prompt"], "text": s["text"]} for s in samples], "decode_tokens_per_s": round(tps, 2)})
