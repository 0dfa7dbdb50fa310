"""Settings every calibrated method shares: how the layer-by-layer engine walks the model.

One torch-free model, mixed into each method config that calibrates (GPTQ, AWQ, SmoothQuant,
Wanda, SparseGPT, structured pruning, MoEfication), so the fields, their defaults and their
descriptions exist once; `LayerwiseOptions.from_config` reads them from any of those configs.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qingzhou.data.calibration import CalibrationConfig


def check_regex(v: str) -> str:
    """`v` if it compiles as a Python regular expression, else a ValueError naming it."""
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"invalid regular expression {v!r}: {e}") from e
    return v


class ModuleRule(BaseModel):
    """Base of per-module overrides: the first rule whose `pattern` matches (re.search on the full
    module name, e.g. `model.layers.3.mlp.down_proj`) wins; unset fields keep the global value,
    `skip: true` leaves the module untouched."""

    model_config = ConfigDict(extra="forbid")

    pattern: str
    skip: bool = False

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return check_regex(v)


class LayerwiseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    device: str | None = Field(None, description="where each layer is calibrated (default: the first accelerator "
                                                 "the device layer finds, else cpu)")
    batch_size: int = Field(8, ge=1, description="calibration samples per forward pass")
    offload_inputs: bool = Field(False, description="keep cached layer inputs on CPU between passes "
                                                    "(least accelerator memory)")
