"""`kind: quantize`: weight-only quantization of the current model (RTN, GPTQ, ...).

The method's own settings sit flat in the stage (`method: gptq`, `bits: 4`, `group_size: 64`,
`calibration: {...}`); they are validated by that method's pydantic config before torch loads.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from qingzhou.recipes.context import ModelRef, StageContext
from qingzhou.recipes.registry import MethodStage, StageResult, register_stage
from qingzhou.registry import Registry

class QuantizeStage(MethodStage):
    kind: Literal["quantize"] = "quantize"
    save_format: Literal["gptq", "dense", "gguf", "compressed-tensors"] = Field(
        "gptq", description="gptq: packed GPTQ checkpoint (transformers/gptqmodel/vLLM); dense: fake-quantised "
                            "fp weights; gguf: one llama.cpp file (model/model.gguf); compressed-tensors: "
                            "llm-compressor's layout (vLLM; also smoothquant W8A8)")
    gguf_type: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"] = Field(
        "q8_0", description="GGUF file type with save_format: gguf (method: none = export only); k-quant mixes "
                            "use llama-quantize's per-tensor rules, f16/bf16 are what llama-quantize takes as input")
    default_method: ClassVar[str] = "gptq"

    @classmethod
    def methods(cls) -> Registry[Any]:
        from qingzhou.compress.quantize.registry import QUANTIZERS

        return QUANTIZERS

    @classmethod
    def parse_method(cls, method: dict[str, Any], stage: dict[str, Any]) -> Any:
        if method["method"] == "none":  # no weight quantizer: save (e.g. GGUF's own q8_0/q4_0) only
            if stage.get("save_format") != "gguf" or set(method) != {"method"}:
                raise ValueError("method: none takes no method settings and needs save_format: gguf")
            return method
        if stage.get("save_format") == "dense":
            method["pack"] = False
        settings = super().parse_method(method, stage)
        if not getattr(settings, "pack", True) and stage.get("save_format", "gptq") == "gptq":
            raise ValueError(f"{method['method']} keeps unpacked layers; use save_format: dense or gguf")
        return settings


@register_stage("quantize", QuantizeStage)
def run_quantize(cfg: QuantizeStage, ctx: StageContext) -> StageResult:
    """Quantise the current model's decoder linears and save it (GPTQ layout, dense or GGUF)."""
    from qingzhou.compress.quantize import quantize
    from qingzhou.compress.quantize.api import save_compressed
    from qingzhou.io import atomic_write_json

    if cfg.method == "bnb":
        return _load_bnb(cfg, ctx)
    model, tokenizer = ctx.get_model()
    out = ctx.work_dir / "model"
    metrics: dict[str, Any] = {}
    if cfg.method == "none":  # GGUF export only
        save_compressed(model, tokenizer, out, "gguf", cfg.gguf_type)
    else:
        report = quantize(model, cfg.settings, tokenizer=tokenizer, output_dir=out, save_format=cfg.save_format,
                          gguf_type=cfg.gguf_type)
        metrics.update(report.summary())
        atomic_write_json(ctx.work_dir / "quantize_report.json", report.to_dict())
    if cfg.save_format == "gguf":
        metrics.update(gguf_type=cfg.gguf_type, gguf_mb=round((out / "model.gguf").stat().st_size / 2**20, 3))
    atomic_write_json(ctx.work_dir / "metrics.json", metrics)
    if cfg.save_format == "gguf":  # continue from the file as written: later stages measure what llama.cpp loads
        from qingzhou.llm import load_model

        ref = ctx.model_ref
        dtype, device = (ref.dtype, ref.device) if ref else ("auto", "auto")
        new_model, new_tok = load_model(str(out / "model.gguf"), dtype=dtype, device=device)
        ctx.set_model(ModelRef(source=ctx.artifact_path("model/model.gguf"), dtype=dtype, device=device),
                      new_model, new_tok)
    else:
        ctx.set_model_artifact("model", model, tokenizer)
    return StageResult(metrics=metrics)


def _load_bnb(cfg: QuantizeStage, ctx: StageContext) -> StageResult:
    """bitsandbytes quantises at load time: re-load the current model's source through it and save
    with transformers' bnb serialisation (save_format is not used)."""
    from qingzhou.compress.quantize.bnb import BnbConfig, load_bnb, save_bnb
    from qingzhou.io import atomic_write_json

    bcfg: BnbConfig = cfg.settings  # load_bnb checks that bitsandbytes runs on bcfg.device first
    ref = ctx.model_ref
    if ref is None:
        from qingzhou.errors import RecipeError

        raise RecipeError("method: bnb needs a loaded model.", where=f"stages.{ctx.index}",
                          hint="Add a `kind: load` stage before it.")
    model, tokenizer = load_bnb(ref.source, bcfg, trust_remote_code=ref.trust_remote_code)
    save_bnb(model, tokenizer, ctx.work_dir / "model")
    metrics = {"method": "bnb", "quant_type": bcfg.quant_type, "bits": bcfg.bits,
               "memory_mb": round(model.get_memory_footprint() / 2**20, 1)}
    atomic_write_json(ctx.work_dir / "metrics.json", metrics)
    ctx.set_model(ModelRef(source=ctx.artifact_path("model"), dtype=ref.dtype, device=bcfg.device,
                           trust_remote_code=ref.trust_remote_code), model, tokenizer)
    return StageResult(metrics=metrics)
