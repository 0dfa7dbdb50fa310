"""`kind: finetune`: adapt the current model (full, LoRA family, QLoRA, IA3, prompt-based) on a data set.

Flat YAML (`method: lora, r: 16, max_steps: 60, data: builtin:industry-qa`): the keys other than
kind/name/method/data/resume/show_prompts are validated against the chosen method's config class.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from qingzhou.data.prepare import DataConfig
from qingzhou.recipes.context import ModelRef, StageContext
from qingzhou.recipes.registry import StageConfig, StageResult, register_stage


class FinetuneStage(StageConfig):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    kind: Literal["finetune"] = "finetune"
    method: str = "lora"
    data: str | DataConfig = Field("builtin:industry-qa", description="a source string or a full data config")
    resume: bool = True
    show_prompts: list[str] = Field(default_factory=list, description="prompts answered before and after training")
    max_new_tokens: int = Field(48, gt=0)

    @classmethod
    def recipe_keys(cls, raw: dict[str, Any]) -> list[str]:
        from qingzhou.finetune.methods import METHODS

        spec = METHODS.get(raw.get("method", "lora"))
        return sorted(set(cls.model_fields) | set(spec.config.model_fields if spec else ()))

    @model_validator(mode="after")
    def _method_fields(self) -> FinetuneStage:
        self.method_config()  # raises ValueError -> pydantic ValidationError -> RecipeError with the YAML line
        return self

    def method_config(self) -> Any:
        from pydantic import ValidationError

        from qingzhou.errors import did_you_mean
        from qingzhou.finetune.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown fine-tuning method '{self.method}'. {did_you_mean(self.method, METHODS)}")
        try:
            return METHODS[self.method].config.model_validate({**(self.model_extra or {}), "method": self.method})
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    from qingzhou.llm import generate

    was_training = model.training
    model.eval()
    out = [generate(model, tokenizer, p, max_new_tokens=max_new_tokens).text for p in prompts]
    model.train(was_training)
    return out


@register_stage("finetune", FinetuneStage)
def run_finetune(cfg: FinetuneStage, ctx: StageContext) -> StageResult:
    """Fine-tune the current model; saves the adapter (or full model) and makes it the current model."""
    from qingzhou.finetune import finetune

    model, tokenizer = ctx.get_model()
    data = cfg.data if isinstance(cfg.data, DataConfig) else DataConfig(source=cfg.data, seed=ctx.seed)
    method_cfg = cfg.method_config()
    if "seed" not in (cfg.model_extra or {}):
        method_cfg = method_cfg.model_copy(update={"seed": ctx.seed})
    before = _answers(model, tokenizer, cfg.show_prompts, cfg.max_new_tokens) if cfg.show_prompts else []
    base = ctx.model_ref.source if ctx.model_ref else None
    result = finetune(model, tokenizer, data, method_cfg, output_dir=ctx.work_dir, resume=cfg.resume, base_source=base)
    metrics: dict[str, Any] = {k: v for k, v in result.to_dict().items() if k not in {"output_dir", "artifact_dir"}}
    if cfg.show_prompts:
        after = _answers(result.model, tokenizer, cfg.show_prompts, cfg.max_new_tokens)
        metrics["answers"] = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(cfg.show_prompts, before, after)]
    ref = ModelRef(source=ctx.artifact_path(result.artifact), dtype=ctx.model_ref.dtype if ctx.model_ref else "auto",
                   device=ctx.model_ref.device if ctx.model_ref else "auto")
    ctx.set_model(ref, result.model, tokenizer)
    return StageResult(metrics=metrics, data_hashes={str(data.source): result.data["fingerprint"]})
