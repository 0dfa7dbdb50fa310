"""`kind: export`: merge the current LoRA/DoRA/IA3 adapter into its base and save a plain model.

Prompt-based adapters are kept in peft format (the stage reports why they cannot merge) and stay
the current model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from qingzhou.recipes.context import ModelRef, StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage


class ExportStage(StageConfig):
    kind: Literal["export"] = "export"
    merge: bool = True
    adapter: str | None = None  # default: the current model, if it is an adapter folder
    base: str | None = None  # default: the base recorded in the adapter


@register_stage("export", ExportStage)
def run_export(cfg: ExportStage, ctx: StageContext) -> StageResult:
    """Merge the fine-tuned adapter into its base model (or keep a prompt adapter as is)."""
    from qingzhou.errors import RecipeError
    from qingzhou.finetune import export_merged

    adapter = cfg.adapter or (ctx.model_ref.source if ctx.model_ref else None)
    if not adapter or not (Path(adapter) / "adapter_config.json").is_file():
        raise RecipeError("export needs an adapter: run a `finetune` stage with an adapter method first, or set `adapter:`.",
                          where=f"stages.{ctx.index}")
    if not cfg.merge:
        return StageResult(metrics={"merged": False, "adapter": adapter})
    result = export_merged(adapter, ctx.work_dir / "model", base_model=cfg.base)
    if result.merged:
        ref = ModelRef(source=ctx.artifact_path("model"),
                       dtype=ctx.model_ref.dtype if ctx.model_ref else "auto",
                       device=ctx.model_ref.device if ctx.model_ref else "auto")
        ctx.set_model(ref)
    return StageResult(metrics=result.to_dict())
