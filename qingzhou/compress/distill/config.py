"""Distillation settings (torch-free, so recipes validate before torch loads)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class HiddenMatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, ge=0, description="weight of the hidden-state term")
    layers: list[int] | None = Field(None, description="student layers matched (1-based hidden_states "
                                                       "indices); default: every student layer")


class DistillLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    divergence: Literal["forward_kl", "reverse_kl", "js"] = "forward_kl"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term; 1 - alpha goes to "
                                                       "cross-entropy on the labels")
    hidden: HiddenMatchConfig | None = None
