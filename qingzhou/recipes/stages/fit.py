"""`kind: fit`: quantise the current model to a budget with the plan of least measured damage.

Exactly one budget key (`max_size: 80MB`, `avg_bits: 3.5` or `min_tok_s: 40`); the quantizer's
own settings sit flat beside it as in a quantize stage (`method: gptq`, `calibration: {...}`,
`device:` - which is also the device a `min_tok_s` budget is timed on). The stage writes the
fitted GPTQ folder (`model/`, with `plan.yaml`, a recipe that reproduces its weights) and the
timing table of a speed budget in the run's `cache/`; `gguf: true` adds `model/model.gguf`, the
same plan in llama.cpp's block formats (`compress/fit/gguf.py`).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from qingzhou.recipes.context import StageContext
from qingzhou.recipes.registry import MethodStage, StageResult, register_stage
from qingzhou.registry import Registry


class FitStage(MethodStage):
    kind: Literal["fit"] = "fit"
    max_size: int | str | None = Field(None, description='file size budget: bytes or "80MB" / "75MiB"')
    avg_bits: float | None = Field(None, description="average bits per weight of the fitted linears "
                                                     "(scales, zeros, g_idx counted)")
    min_tok_s: float | None = Field(None, description="predicted batch-1 decode tokens/s on the method's device")
    heldout: float = Field(0.1, ge=0, lt=1, description="fraction of calibration samples kept out of the "
                                                        "measurement for the end-to-end KL check")
    neighbours: list[float] = Field([0.95, 0.98, 1.02, 1.05], description="budget factors whose plans are also "
                                                                          "KL-checked (<= 1 may win)")
    gguf: bool = Field(False, description="also write model/model.gguf: the plan as llama.cpp per-tensor types "
                                           "from the original weights (Llama, Mistral, Qwen2, Gemma 3)")
    gguf_keep: Literal["f16", "bf16", "f32"] = Field("f16", description="GGUF type of kept linears and embeddings")
    drop_layers: int = Field(0, ge=0, description="at most this many whole decoder layers may be dropped, "
                                                  "where that measures better (size and bits budgets)")
    kl_calibrate: int = Field(2, ge=0, description="held-out samples on which each decoder layer's and each kind "
                                                   "of linear's end-to-end KL calibrates the per-linear losses "
                                                   "(0: the Fisher-weighted proxy as measured)")
    default_method: ClassVar[str] = "gptq"

    @classmethod
    def methods(cls) -> Registry[Any]:
        from qingzhou.compress.quantize.registry import QUANTIZERS

        return QUANTIZERS

    @model_validator(mode="after")
    def _one_budget(self) -> FitStage:
        self.budget()
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"fit measures and applies gptq or rtn, not {self.method!r}")
        return self

    def budget(self) -> Any:
        """The stage's `Budget` (a ValueError, for pydantic to place, when not exactly one is given)."""
        from qingzhou.compress.fit.budget import Budget
        from qingzhou.errors import QingzhouError

        device = getattr(self.settings, "device", None) if self.min_tok_s is not None else None
        try:
            return Budget(max_size=self.max_size, avg_bits=self.avg_bits, min_tok_s=self.min_tok_s,  # type: ignore[arg-type]
                          device=device)
        except QingzhouError as e:
            raise ValueError(f"{e.message} {e.hint or ''}".strip()) from None


@register_stage("fit", FitStage)
def run_fit(cfg: FitStage, ctx: StageContext) -> StageResult:
    """Fit the current model to the budget, save the GPTQ folder and its plan recipe."""
    from qingzhou.compress.fit import fit
    from qingzhou.io import atomic_write_json

    model, tokenizer = ctx.get_model()
    ref = ctx.model_ref
    report = fit(model, cfg.budget(), cfg.settings, tokenizer=tokenizer, output_dir=ctx.work_dir / "model",
                 heldout=cfg.heldout, neighbours=tuple(cfg.neighbours), timing_cache=ctx.run_dir / "cache",
                 load_stage={"model": ref.source, "dtype": ref.dtype} if ref else None, gguf=cfg.gguf,
                 gguf_keep=cfg.gguf_keep, drop_layers=cfg.drop_layers, kl_calibrate=cfg.kl_calibrate)
    metrics = report.summary()
    atomic_write_json(ctx.work_dir / "fit_report.json", report.to_dict())
    atomic_write_json(ctx.work_dir / "metrics.json", metrics)
    ctx.set_model_artifact("model", model, tokenizer)
    return StageResult(metrics=metrics)
