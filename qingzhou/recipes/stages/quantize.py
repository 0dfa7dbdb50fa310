"""`kind: quantize`: weight-only quantization of the current model (RTN, GPTQ, ...).

The method's own settings sit flat in the stage (`method: gptq`, `bits: 4`, `group_size: 64`,
`calibration: {...}`); they are validated by that method's pydantic config before torch loads.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from qingzhou.recipes.context import ModelRef, StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage

_STAGE_KEYS = {"kind", "name", "save_format", "settings"}


class QuantizeStage(StageConfig):
    kind: Literal["quantize"] = "quantize"
    save_format: Literal["gptq", "dense"] = Field(
        "gptq", description="gptq: packed GPTQ checkpoint (transformers/gptqmodel/vLLM); dense: fake-quantised fp weights")
    settings: dict[str, Any] = Field(default_factory=dict, description="the method config (filled from the flat keys)")

    @classmethod
    def recipe_keys(cls, raw: dict[str, Any]) -> list[str]:
        from qingzhou.compress.quantize.registry import load_quantizers

        spec = load_quantizers().get(raw.get("method", "gptq"))
        return sorted((_STAGE_KEYS - {"settings"}) | set(spec.config.model_fields if spec else ()))

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        """Move the method's keys into `settings` and validate them with the method's config."""
        if not isinstance(data, dict):
            return data
        from qingzhou.compress.quantize.registry import parse_config

        stage = {k: v for k, v in data.items() if k in _STAGE_KEYS}
        method = {k: v for k, v in data.items() if k not in _STAGE_KEYS}
        method.setdefault("method", "gptq")
        if stage.get("save_format") == "dense":
            method["pack"] = False
        stage["settings"] = parse_config(method).model_dump(mode="json")
        return stage


@register_stage("quantize", QuantizeStage)
def run_quantize(cfg: QuantizeStage, ctx: StageContext) -> StageResult:
    """Quantise the current model's decoder linears and save it (GPTQ layout or dense)."""
    from qingzhou.compress.quantize import quantize, save_quantized
    from qingzhou.io import atomic_write_json

    model, tokenizer = ctx.get_model()
    report = quantize(model, cfg.settings, tokenizer=tokenizer)
    out = ctx.work_dir / "model"
    if cfg.save_format == "gptq":
        save_quantized(model, out, tokenizer)
    else:
        from qingzhou.llm import save_model

        save_model(model, tokenizer, out)
    metrics = report.summary()
    atomic_write_json(ctx.work_dir / "quantize_report.json", report.to_dict())
    atomic_write_json(ctx.work_dir / "metrics.json", metrics)
    ref = ctx.model_ref
    ctx.set_model(ModelRef(source=ctx.artifact_path("model"), dtype=ref.dtype if ref else "auto",
                           device=ref.device if ref else "auto"), model, tokenizer)
    return StageResult(metrics=metrics)
