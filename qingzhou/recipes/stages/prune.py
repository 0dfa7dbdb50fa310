"""`kind: prune`: prune the current model (magnitude, Wanda, SparseGPT, N:M, OWL, or structured).

The method's own settings sit flat in the stage (`method: wanda`, `sparsity: 0.5` or `nm: "2:4"`,
`calibration: {...}`); they are validated by that method's pydantic config before torch loads.
Unstructured/N:M pruning keeps the shapes (exact zeros); `method: structured` saves a smaller
dense model. Either way the saved folder loads with plain transformers.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from qingzhou.recipes.context import ModelRef, StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage

_STAGE_KEYS = {"kind", "name", "settings"}


class PruneStage(StageConfig):
    kind: Literal["prune"] = "prune"
    settings: dict[str, Any] = Field(default_factory=dict, description="the method config (filled from the flat keys)")

    @classmethod
    def recipe_keys(cls, raw: dict[str, Any]) -> list[str]:
        from qingzhou.compress.prune.registry import load_pruners

        spec = load_pruners().get(raw.get("method", "wanda"))
        return sorted((_STAGE_KEYS - {"settings"}) | set(spec.config.model_fields if spec else ()))

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        """Move the method's keys into `settings` and validate them with the method's config."""
        if not isinstance(data, dict):
            return data
        from qingzhou.compress.prune.registry import parse_config

        stage = {k: v for k, v in data.items() if k in _STAGE_KEYS}
        method = {k: v for k, v in data.items() if k not in _STAGE_KEYS}
        method.setdefault("method", "wanda")
        stage["settings"] = parse_config(method).model_dump(mode="json")
        return stage


@register_stage("prune", PruneStage)
def run_prune(cfg: PruneStage, ctx: StageContext) -> StageResult:
    """Prune the current model's decoder linears (or shrink it, structured) and save it."""
    from qingzhou.compress.prune import prune
    from qingzhou.io import atomic_write_json
    from qingzhou.llm import save_model

    model, tokenizer = ctx.get_model()
    report = prune(model, cfg.settings, tokenizer=tokenizer)
    save_model(model, tokenizer, ctx.work_dir / "model")
    metrics = report.summary()
    atomic_write_json(ctx.work_dir / "prune_report.json", report.to_dict())
    atomic_write_json(ctx.work_dir / "metrics.json", metrics)
    ref = ctx.model_ref
    ctx.set_model(ModelRef(source=ctx.artifact_path("model"), dtype=ref.dtype if ref else "auto",
                           device=ref.device if ref else "auto"), model, tokenizer)
    return StageResult(metrics=metrics)
