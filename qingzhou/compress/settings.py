"""Settings every calibrated method shares: how the layer-by-layer engine walks the model.

One torch-free model, mixed into each method config that calibrates (GPTQ, AWQ, SmoothQuant,
Wanda, SparseGPT, structured pruning, MoEfication), so the fields, their defaults and their
descriptions exist once; `LayerwiseOptions.from_config` reads them from any of those configs.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from qingzhou.data.calibration import CalibrationConfig


class LayerwiseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    device: str | None = Field(None, description="where each layer is calibrated (default: the first accelerator "
                                                 "the device layer finds, else cpu)")
    batch_size: int = Field(8, ge=1, description="calibration samples per forward pass")
    offload_inputs: bool = Field(False, description="keep cached layer inputs on CPU between passes "
                                                    "(least accelerator memory)")
