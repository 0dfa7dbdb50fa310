"""`kind: moefy`: split every FFN of the current model into experts with a router (MoEfication).

The `MoefyConfig` settings sit flat in the stage (`num_experts: 8`, `top_k: 4`, `router: trained`,
`calibration: {...}`, optional `evaluate: {...}` for the perplexity-vs-compute table). The saved
folder is the dense model with its FFN neurons reordered (plain transformers loads it as the dense
model) plus `moefication.json` / `moefication.safetensors`, which
`qingzhou.compress.moefy.apply_moefication` re-applies.
"""
from __future__ import annotations

from typing import Literal

from qingzhou.compress.moefy.config import MoefyConfig
from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage


class MoefyStage(MoefyConfig, StageConfig):
    kind: Literal["moefy"] = "moefy"


@register_stage("moefy", MoefyStage)
def run_moefy(cfg: MoefyStage, ctx: StageContext) -> StageResult:
    """Turn the current model's FFNs into experts + router, save it, and report quality vs compute."""
    from qingzhou.compress.moefy import moefy
    from qingzhou.io import atomic_write_json

    model, tokenizer = ctx.get_model()
    settings = MoefyConfig.model_validate(cfg.model_dump(exclude={"kind", "name"}))
    report = moefy(model, settings, tokenizer=tokenizer, output_dir=ctx.work_dir / "model")
    metrics = report.summary()
    atomic_write_json(ctx.work_dir / "moefy_report.json", report.to_dict())
    atomic_write_json(ctx.work_dir / "metrics.json", metrics)
    ctx.set_model_artifact("model", model, tokenizer)
    return StageResult(metrics=metrics)
