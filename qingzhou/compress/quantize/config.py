"""Settings shared by every weight quantizer (torch-free so recipes validate before torch loads).

Each method's own config subclasses `QuantizeConfig` in the method's file and adds a
`method: Literal[...]` discriminator plus its knobs.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qingzhou.compress.settings import LayerwiseSettings, ModuleRule, check_regex

# Group sizes a layer may fall back to when `group_size` does not divide its input width, largest
# first: the sizes GPTQ kernels (exllama, marlin) accept besides -1 (see QuantizeConfig).
FALLBACK_GROUP_SIZES = (128, 64, 32)


class ModuleOverride(ModuleRule):
    """Per-module bits / group size / symmetry (see `ModuleRule` for how rules match)."""

    bits: int | None = Field(None, ge=2, le=8)
    group_size: int | None = None
    sym: bool | None = None

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        return _check_group_size(v) if v is not None else v


def _check_group_size(v: int) -> int:
    if v != -1 and v < 1:
        raise ValueError("group_size must be -1 (one group per output channel) or a positive integer")
    return v


class QuantizeConfig(BaseModel):
    """Common weight-only settings. Only `nn.Linear` modules inside the decoder layers are
    quantised: `lm_head` and the embeddings are never touched (tied embeddings make them one
    tensor, and they are the most sensitive weights).

    Why `on_indivisible_group: fallback` is the default: the usual group size 128 does not divide
    the widths of many small models (SmolLM2-135M's 576, SmolLM2-360M's 960), and stopping there
    made the default model fail with default flags. A layer whose width `group_size` does not
    divide instead takes the largest of `FALLBACK_GROUP_SIZES` below `group_size` that divides it
    (576 -> 64), else one group per output channel (-1). Those sizes are exactly the ones every
    GPTQ runtime loads (exllama/marlin kernels in gptqmodel and vLLM take -1, 32, 64, 128; torch's
    int4 kernel 32..256), so the checkpoint still loads everywhere, unlike a `ragged` last group;
    a smaller group is at least as accurate as the one asked for (it costs one more scale and zero
    per group). Each such layer is recorded: `group_size_requested` beside its `group_size` in the
    report, and a `+:^name$` entry with its group size in `quantization_config.dynamic`, which
    gptqmodel, vLLM and qingzhou's loader read. `error` restores the strict behaviour."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    method: str
    bits: int = Field(4, ge=2, le=8, description="bits per weight (2, 3, 4, 8 load in every GPTQ runtime)")
    group_size: int = Field(128, description="input columns sharing a scale/zero; -1 = per output channel")
    sym: bool = Field(False, description="symmetric grid (zero fixed at 2**(bits-1)); asymmetric is far "
                                         "better on small models")
    clip_search: bool = Field(True, description="search a shrunken range per group that minimises rounding error")
    skip: list[str] = Field(default_factory=list, description="regexes of module names left in full precision")
    overrides: list[ModuleOverride] = Field(default_factory=list)
    on_indivisible_group: Literal["fallback", "per_channel", "ragged", "error"] = Field(
        "fallback",
        description="when group_size does not divide a layer's input width: use the largest of 128/64/32 "
                    "below group_size that divides it, else one group per output channel (default; every "
                    "GPTQ runtime loads it); per_channel for that layer; keep a shorter last group (ragged: "
                    "qingzhou and torch kernels only, not exllama/marlin/vLLM); or raise (error)",
    )
    pack: bool = Field(True, description="replace linears by packed QuantLinear layers (False: keep dense "
                                         "fake-quantised weights, for analysis)")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        return _check_group_size(v)

    @field_validator("skip")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return [check_regex(p) for p in v]


class CalibratedConfig(LayerwiseSettings, QuantizeConfig):
    """Settings of methods that walk the decoder layers with calibration data."""

