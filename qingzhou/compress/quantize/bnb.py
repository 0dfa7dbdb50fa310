"""bitsandbytes NF4 / FP4 / int8, applied while loading (no calibration).

bitsandbytes quantises weights as they are moved to the GPU, inside transformers'
`from_pretrained(quantization_config=BitsAndBytesConfig(...))`, so this method is a *load-time*
one: `load_bnb(source, cfg)` returns (model, tokenizer) with `Linear4bit`/`Linear8bitLt` layers,
and the quantize stage re-loads the current model that way and saves it with transformers' own
bnb serialisation (which `load_model` reads back through the config's `quantization_config`).
The device check comes first, so a CPU/NPU machine or a missing install gets a `DeviceError`
naming what is supported, not an import error deep inside transformers.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from qingzhou.compress.quantize.config import QuantizeConfig
from qingzhou.compress.quantize.registry import register_quantizer

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class BnbConfig(QuantizeConfig):
    method: Literal["bnb"] = "bnb"
    quant_type: Literal["nf4", "fp4", "int8"] = "nf4"
    double_quant: bool = Field(True, description="quantise the 4-bit block scales too (QLoRA's double quantisation)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    int8_threshold: float = Field(6.0, description="LLM.int8 outlier threshold (int8 only)")
    group_size: int = Field(64, description="bitsandbytes' fixed 4-bit block size (informational)")
    device: str = Field("cuda", description="bitsandbytes runs on CUDA (and ROCm builds)")

    @model_validator(mode="after")
    def _bits(self) -> BnbConfig:
        self.bits = 8 if self.quant_type == "int8" else 4
        return self


def to_transformers(cfg: BnbConfig) -> Any:
    """The equivalent `transformers.BitsAndBytesConfig` (lm_head and skipped modules stay dense)."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = ["lm_head", *cfg.skip]
    if cfg.quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.int8_threshold,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
                              llm_int8_skip_modules=skip)


def require_bnb(device: str) -> None:
    """`DeviceError` unless bitsandbytes is installed and usable on `device`."""
    import importlib.util

    from qingzhou.errors import DeviceError
    from qingzhou.llm.devices import require

    require("bitsandbytes", device)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DeviceError("bitsandbytes is not installed.", where="method: bnb",
                          hint="pip install bitsandbytes (CUDA machines), or use method: rtn/gptq/awq, "
                               "which run everywhere.")


def load_bnb(source: str, cfg: BnbConfig | dict[str, Any], *, trust_remote_code: bool = False):
    """Load `source` (alias, folder, .gguf, hub id) quantised by bitsandbytes: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qingzhou.llm.loading import resolve_source

    cfg = cfg if isinstance(cfg, BnbConfig) else BnbConfig.model_validate({"method": "bnb", **cfg})
    require_bnb(cfg.device)
    src = resolve_source(source)
    extra: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        extra["gguf_file"] = src.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(src.folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(src.folder, quantization_config=to_transformers(cfg),
                                                 device_map={"": cfg.device}, **extra)
    return model.eval(), tokenizer


@register_quantizer("bnb", BnbConfig, needs_calibration=False)
def run_bnb(model: nn.Module, cfg: BnbConfig, plan: dict[str, Any], calib: Any) -> dict[str, Any]:
    """bitsandbytes cannot rewrite an already-loaded model in place: check the device (the usual
    failure), then point to the load-time path."""
    from qingzhou.errors import RecipeError

    require_bnb(cfg.device)
    raise RecipeError("bitsandbytes quantises while loading.", where="method: bnb",
                      hint="Use qingzhou.compress.quantize.bnb.load_bnb(source, cfg), or the quantize "
                           "stage (it re-loads the current model).")


def save_bnb(model: Any, tokenizer: Any, folder: str | Path) -> Path:
    """transformers' own bnb serialisation (safetensors + quantization_config), atomically."""
    from qingzhou.io import atomic_dir

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder
