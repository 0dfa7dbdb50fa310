"""`kind: finetune`: adapt the current model (full, LoRA family, QLoRA, IA3, prompt-based) on a data set.

Flat YAML (`method: lora, r: 16, max_steps: 60, data: builtin:industry-qa`): the keys other than
the stage's own (kind/name/data/resume/show_prompts/max_new_tokens) are the method's settings,
validated by that method's config class like the quantize and prune stages' (`MethodStage`).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from qingzhou.data.prepare import DataConfig
from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import MethodStage, StageResult, register_stage
from qingzhou.registry import Registry


class FinetuneStage(MethodStage):
    kind: Literal["finetune"] = "finetune"
    data: str | DataConfig = Field("builtin:industry-qa", description="a source string or a full data config")
    resume: bool = True
    show_prompts: list[str] = Field(default_factory=list, description="prompts answered before and after training")
    max_new_tokens: int = Field(48, gt=0)
    default_method: ClassVar[str] = "lora"

    @classmethod
    def methods(cls) -> Registry[Any]:
        from qingzhou.finetune.methods import METHODS

        return METHODS

    def method_settings(self) -> dict[str, Any]:
        """As MethodStage, but a `seed` the stage does not set stays unset: the run's seed fills it
        (also when a resolved recipe is re-run with another seed)."""
        settings = super().method_settings()
        if "seed" not in self.settings.model_fields_set:
            settings.pop("seed", None)
        return settings

    def method_config(self, seed: int = 0) -> Any:
        """The method's config (FinetuneConfig subclass), with `seed` unless the stage set one."""
        if "seed" in self.settings.model_fields_set:
            return self.settings
        return self.settings.model_copy(update={"seed": seed})


def _answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    from qingzhou.llm import generate
    from qingzhou.llm.modes import eval_mode

    with eval_mode(model):
        return [generate(model, tokenizer, p, max_new_tokens=max_new_tokens).text for p in prompts]


@register_stage("finetune", FinetuneStage)
def run_finetune(cfg: FinetuneStage, ctx: StageContext) -> StageResult:
    """Fine-tune the current model; saves the adapter (or full model) and makes it the current model."""
    from qingzhou.finetune import finetune

    model, tokenizer = ctx.get_model()
    data = cfg.data if isinstance(cfg.data, DataConfig) else DataConfig(source=cfg.data, seed=ctx.seed)
    method_cfg = cfg.method_config(ctx.seed)
    before = _answers(model, tokenizer, cfg.show_prompts, cfg.max_new_tokens) if cfg.show_prompts else []
    base = ctx.model_ref.source if ctx.model_ref else None
    # checkpoints beside the stage folder: the temp folder goes on a crash, they must not
    result = finetune(model, tokenizer, data, method_cfg, output_dir=ctx.work_dir, resume=cfg.resume, base_source=base,
                      checkpoint_dir=ctx.checkpoints())
    metrics: dict[str, Any] = {k: v for k, v in result.to_dict().items() if k not in {"output_dir", "artifact_dir"}}
    if cfg.show_prompts:
        after = _answers(result.model, tokenizer, cfg.show_prompts, cfg.max_new_tokens)
        metrics["answers"] = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(cfg.show_prompts, before, after)]
    ctx.set_model_artifact(result.artifact, result.model, tokenizer)
    return StageResult(metrics=metrics, data_hashes={str(data.source): result.data["fingerprint"]})
