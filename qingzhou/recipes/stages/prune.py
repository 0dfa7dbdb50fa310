"""`kind: prune`: prune the current model (magnitude, Wanda, SparseGPT, N:M, OWL, or structured).

The method's own settings sit flat in the stage (`method: wanda`, `sparsity: 0.5` or `nm: "2:4"`,
`calibration: {...}`); they are validated by that method's pydantic config before torch loads.
Unstructured/N:M pruning keeps the shapes (exact zeros); `method: structured` saves a smaller
dense model. Either way the saved folder loads with plain transformers.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import MethodStage, StageResult, register_stage
from qingzhou.registry import Registry

class PruneStage(MethodStage):
    kind: Literal["prune"] = "prune"
    default_method: ClassVar[str] = "wanda"

    @classmethod
    def methods(cls) -> Registry[Any]:
        from qingzhou.compress.prune.registry import PRUNERS

        return PRUNERS


@register_stage("prune", PruneStage)
def run_prune(cfg: PruneStage, ctx: StageContext) -> StageResult:
    """Prune the current model's decoder linears (or shrink it, structured) and save it."""
    from qingzhou.compress.prune import prune
    from qingzhou.io import atomic_write_json

    model, tokenizer = ctx.get_model()
    report = prune(model, cfg.settings, tokenizer=tokenizer, output_dir=ctx.work_dir / "model")
    metrics = report.summary()
    atomic_write_json(ctx.work_dir / "prune_report.json", report.to_dict())
    atomic_write_json(ctx.work_dir / "metrics.json", metrics)
    ctx.set_model_artifact("model", model, tokenizer)
    return StageResult(metrics=metrics)
