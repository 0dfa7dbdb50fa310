"""`kind: distill`: train the current model (the student) towards a teacher, usually the model the
run started from, to win back quality lost to pruning or quantization.

    - kind: distill
      teacher: base            # the run's first loaded model | an earlier stage's name | a model source
      data: {source: builtin:calib, format: text, max_length: 512}
      method: full             # any fine-tuning method: full (pruned students), lora or quant_scales (quantized ones) ...
      learning_rate: 1.0e-4
      max_steps: 200
      divergence: forward_kl   # distillation settings sit flat beside the training settings
      temperature: 2.0
      kd_ratio: 0.9
      top_k: 64

Flat keys other than the stage's own are validated together by `DistillConfig` (distillation
settings) and the chosen method's fine-tuning config (everything else), before torch loads.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from qingzhou.data.prepare import DataConfig
from qingzhou.recipes.context import ModelRef, StageContext
from qingzhou.recipes.registry import MethodStage, StageResult, register_stage
from qingzhou.registry import Registry


class DistillStage(MethodStage):
    kind: Literal["distill"] = "distill"
    default_method: ClassVar[str] = "full"
    teacher: str = Field("base", description="'base' (the run's first loaded model), the name of an earlier "
                                             "stage whose model to use, or a model source (alias, folder, hub id)")
    data: str | DataConfig = Field("builtin:calib", description="a source string or a full data config")
    resume: bool = True

    @classmethod
    def methods(cls) -> Registry[Any]:
        from qingzhou.finetune.methods import METHODS

        return METHODS

    @classmethod
    def recipe_keys(cls, raw: dict[str, Any]) -> list[str]:
        from qingzhou.finetune.distill.config import DistillConfig

        return sorted(set(super().recipe_keys(raw)) | set(DistillConfig.model_fields) - {"train"})

    @classmethod
    def parse_method(cls, method: dict[str, Any], stage: dict[str, Any]) -> Any:
        from qingzhou.finetune.distill.config import parse_distill_config

        return parse_distill_config(method)


def teacher_ref(name: str, ctx: StageContext) -> ModelRef:
    """The teacher's ModelRef: the first loaded model, an earlier stage's output, or a new source
    (loaded with the current model's dtype/device)."""
    for entry in ctx.history:
        if (name == "base" and entry["kind"] == "load") or name == entry.get("label"):
            if entry.get("model_out"):
                return ModelRef.from_dict(entry["model_out"])
    if name == "base":
        from qingzhou.errors import RecipeError

        raise RecipeError("teacher 'base' needs an earlier `kind: load` stage.", where=f"stages.{ctx.index}.teacher")
    current = ctx.model_ref
    return ModelRef(source=name, dtype=current.dtype if current else "auto", device=current.device if current else "auto")


@register_stage("distill", DistillStage)
def run_distill(cfg: DistillStage, ctx: StageContext) -> StageResult:
    """Distil a teacher into the current model; saves the student (or its adapter) and makes it current."""
    from qingzhou.finetune.distill import distill
    from qingzhou.llm import load_model

    model, tokenizer = ctx.get_model()
    ref = teacher_ref(cfg.teacher, ctx)
    # loaded apart from the run's model cache, which holds the student
    teacher, _ = load_model(ref.source, dtype=ref.dtype, device=ref.device, trust_remote_code=ref.trust_remote_code,
                            allow_pickle=ref.allow_pickle, strict=ref.strict)
    data = cfg.data if isinstance(cfg.data, DataConfig) else DataConfig(source=cfg.data, seed=ctx.seed)
    base = ctx.model_ref.source if ctx.model_ref else None
    # checkpoints beside the stage folder: the temp folder goes on a crash, they must not
    report = distill(model, teacher, tokenizer, cfg.settings, data, output_dir=ctx.work_dir, resume=cfg.resume,
                     base_source=base, checkpoint_dir=ctx.checkpoints())
    del teacher
    result = report.finetune
    ctx.set_model_artifact(result.artifact, result.model, tokenizer)
    metrics = {**report.summary(), "teacher_source": ref.source}
    return StageResult(metrics=metrics, data_hashes={str(data.source): result.data["fingerprint"]})
