"""bitsandbytes NF4 / FP4 / int8 (LLM.int8): no calibration, on CUDA and (bitsandbytes >= 0.46) CPU.

Two ways in, one set of layers out (`bnb.nn.Linear4bit` / `Linear8bitLt`):
* in memory: `quantize(model, {"method": "bnb", ...})` swaps the decoder linears of a model already
  loaded (from any source, GGUF included) for bitsandbytes layers, quantising each weight where it
  lies. The model is then marked the way transformers marks a model it loaded with a
  `BitsAndBytesConfig` (config.quantization_config, hf_quantizer, is_loaded_in_4bit), so
  `save_pretrained` writes transformers' own bnb serialisation, `load_model` reads it back, and
  peft puts its bnb-aware LoRA layers on it (QLoRA reuses this, see finetune/qlora.py);
* at load time: `load_bnb(source, cfg)` has transformers quantise while loading, which never holds
  the full-precision weights of a big model in memory at once.
Both quantise the same linears: those `select_linears` picks in the decoder layers (`skip` and
`overrides` with `skip: true` honoured); lm_head, embeddings and anything outside the decoder
layers stay dense. The device check comes first, so an unsupported device or install gets a
`DeviceError` naming what is supported, not an error deep inside bitsandbytes.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from qingzhou.compress.quantize.config import QuantizeConfig
from qingzhou.compress.quantize.registry import register_quantizer
from qingzhou.llm.devices import bitsandbytes_device, import_bitsandbytes

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class BnbConfig(QuantizeConfig):
    method: Literal["bnb"] = "bnb"
    quant_type: Literal["nf4", "fp4", "int8"] = "nf4"
    double_quant: bool = Field(True, description="quantise the 4-bit block scales too (QLoRA's double quantisation)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype 4-bit weights are dequantised to for the matmul (auto: float32 on CPU, bf16/fp16 on GPUs)")
    int8_threshold: float = Field(6.0, description="LLM.int8 outlier threshold (int8 only)")
    group_size: int = Field(64, description="bitsandbytes' fixed 4-bit block size (informational)")
    on_indivisible_group: Literal["error", "per_channel", "ragged"] = Field(
        "ragged", description="bitsandbytes blocks run over the flattened weight: any width works")
    device: str = Field("auto", description="where the bitsandbytes layers run: cuda or cpu (auto: the model's "
                                            "device in memory; cuda if present, else cpu, at load time)")

    @model_validator(mode="after")
    def _bits(self) -> BnbConfig:
        self.bits = 8 if self.quant_type == "int8" else 4
        return self


def _compute_dtype(cfg: BnbConfig, device: str) -> Any:
    import torch

    from qingzhou.llm.devices import resolve_dtype

    return resolve_dtype("auto", device) if cfg.compute_dtype == "auto" else getattr(torch, cfg.compute_dtype)


def to_transformers(cfg: BnbConfig, keep: list[str] | None = None, device: str = "cpu") -> Any:
    """The equivalent `transformers.BitsAndBytesConfig`. `keep`: exact names of the linears left
    dense (default lm_head + the `skip` patterns)."""
    from transformers import BitsAndBytesConfig

    skip = [re.escape(name) for name in keep] if keep is not None else ["lm_head", *cfg.skip]
    if cfg.quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.int8_threshold,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=_compute_dtype(cfg, device),
                              llm_int8_skip_modules=skip)


def dense_linears(model: nn.Module, cfg: BnbConfig) -> tuple[list[str], list[str]]:
    """(linears to quantise, every other full-precision linear) under the shared selection rule."""
    from torch import nn

    from qingzhou.compress.calibrate import select_linears

    chosen, _ = select_linears(model, cfg.skip, cfg.overrides)
    names = [name for name, module, _ in chosen if type(module) is nn.Linear]
    picked = set(names)
    keep = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in picked]
    return names, keep


def bnb_linear(linear: nn.Linear, cfg: BnbConfig, device: str) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight, quantised on `device` (bitsandbytes quantises
    when a not-yet-quantised parameter is moved to a device); same train/eval mode as `linear`, and
    kept in bitsandbytes' reference layout (see `keep_bnb_4bit_layout`)."""
    import torch

    from qingzhou.llm.devices import keep_bnb_4bit_layout

    bnb = import_bitsandbytes()
    weight = linear.weight.data
    bias = linear.bias is not None
    if cfg.quant_type == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=cfg.int8_threshold, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                  compute_dtype=_compute_dtype(cfg, device), compress_statistics=cfg.double_quant,
                                  quant_type=cfg.quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=cfg.double_quant,
                                         quant_type=cfg.quant_type)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return keep_bnb_4bit_layout(layer.to(device).train(linear.training))


def quantize_in_place(model: nn.Module, cfg: BnbConfig, device: str | None = None) -> dict[str, Any]:
    """Swap the selected linears of `model` for bitsandbytes layers on `device` (default: where the
    model is) and mark the model as bnb-quantised. Returns {"modules", "linear_bytes_after", ...}."""
    device = bitsandbytes_device(device or _model_device(model, cfg))
    names, keep = dense_linears(model, cfg)
    modules: dict[str, dict[str, Any]] = {}
    after = 0
    for name in names:
        layer = bnb_linear(model.get_submodule(name), cfg, device)
        model.set_submodule(name, layer)
        after += _layer_bytes(layer)
        modules[name] = {"quant_type": cfg.quant_type}
    qc = to_transformers(cfg, keep, device)
    mark_bnb_quantized(model, qc)
    return {"modules": modules, "linear_bytes_after": after, "device": device, "quantization_config": qc.to_dict()}


def _model_device(model: nn.Module, cfg: BnbConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    return str(next(model.parameters()).device)


def _layer_bytes(layer: nn.Module) -> int:
    """Bytes a bitsandbytes layer holds: packed weight, bias and the block scales / quant state."""
    total = sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
    state = getattr(layer.weight, "quant_state", None)
    if state is not None:
        total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values() if hasattr(t, "numel"))
    scb = getattr(layer.weight, "SCB", None)
    return total + (scb.numel() * scb.element_size() if scb is not None else 0)


def mark_bnb_quantized(model: nn.Module, qc: Any) -> None:
    """Make an in-memory swapped model look like one transformers loaded with `qc` (the attributes
    its quantizer's preprocess step sets, then its own postprocess step): save_pretrained then
    writes bnb weights + quantization_config, and peft dispatches its bnb-aware LoRA layers."""
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = qc.quant_method
    quantizer.postprocess_model(model)


def load_bnb(source: str, cfg: BnbConfig | dict[str, Any], *, trust_remote_code: bool = False):
    """Load `source` (alias, folder, .gguf, hub id) quantised by bitsandbytes while loading: (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qingzhou.llm.devices import keep_bnb_4bit_layout
    from qingzhou.llm.loading import resolve_source

    cfg = cfg if isinstance(cfg, BnbConfig) else BnbConfig.model_validate({"method": "bnb", **cfg})
    device = bitsandbytes_device(cfg.device)
    src = resolve_source(source)
    extra: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        extra["gguf_file"] = src.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(src.folder, **extra)
    keep = _keep_on_meta(AutoConfig.from_pretrained(src.folder, **extra), cfg, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(src.folder, quantization_config=to_transformers(cfg, keep, device),
                                                 device_map={"": device}, **extra)
    return keep_bnb_4bit_layout(model).eval(), tokenizer


def _keep_on_meta(config: Any, cfg: BnbConfig, trust_remote_code: bool) -> list[str]:
    """The linears left dense, decided on a weightless (meta) copy of the architecture, so the
    load-time path quantises exactly what the in-memory path would."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return dense_linears(skeleton, cfg)[1]


@register_quantizer("bnb", BnbConfig, needs_calibration=False)
def run_bnb(model: nn.Module, cfg: BnbConfig, plan: dict[str, Any], calib: Any) -> dict[str, Any]:
    """Replace the decoder linears by bitsandbytes layers in place (the selection is `plan`'s:
    both come from `select_linears`)."""
    return quantize_in_place(model, cfg)


def save_bnb(model: Any, tokenizer: Any, folder: str | Path) -> Path:
    """transformers' own bnb serialisation (safetensors + quantization_config), atomically."""
    from qingzhou.llm.saving import save_model

    return save_model(model, tokenizer, folder)
