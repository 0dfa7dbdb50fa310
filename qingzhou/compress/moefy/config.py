"""MoEfication settings (torch-free, so recipes validate before torch loads)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qingzhou.compress.settings import LayerwiseSettings, check_regex


class MoefyEvalConfig(BaseModel):
    """The quality table: perplexity of the moefied model for several experts-per-token counts."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field("builtin:corpus", description="builtin:NAME, a text file, or hf:DATASET:SPLIT")
    seq_len: int = Field(512, ge=8)
    max_windows: int | None = Field(8, ge=1, description="first N windows (None: the whole text)")
    top_k: list[int] | None = Field(None, description="experts per token to measure (default: k, k/2, k/4)")


class MoefyConfig(LayerwiseSettings):
    """Split every decoder FFN into `num_experts` experts of co-activated neurons and run only the
    `top_k` experts a router picks for each token (MoEfication, Zhang et al. 2022; BMCook)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    num_experts: int = Field(8, ge=2, description="k: experts per FFN (neurons split into equal groups)")
    top_k: int = Field(4, ge=1, description="e: experts run per token; FFN compute kept = e/k")
    cluster_on: Literal["activations", "weights"] = Field(
        "activations", description="activations: group neurons that fire on the same calibration tokens "
                                   "(co-activation); weights: group similar input weight vectors "
                                   "(the paper's parameter clustering, data-free)")
    router: Literal["centroid", "trained"] = Field(
        "centroid", description="centroid: score = input . mean of the expert's gate (or up) rows; "
                                "trained: a small MLP fitted to each expert's share of the FFN output")
    router_hidden: int = Field(64, ge=0, description="trained router hidden width (0: a linear router)")
    router_steps: int = Field(300, ge=1)
    router_lr: float = Field(3e-3, gt=0)
    max_tokens: int = Field(8192, ge=64, description="calibration tokens kept per layer for clustering "
                                                     "and router training")
    kmeans_iters: int = Field(25, ge=1)
    seed: int = 0
    skip: list[str] = Field(default_factory=list, description="regexes of MLP names left dense, "
                                                              r"e.g. 'layers\.0\.mlp'")
    evaluate: MoefyEvalConfig | None = Field(None, description="also measure perplexity for several top_k")

    @field_validator("skip")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return [check_regex(p) for p in v]

    @model_validator(mode="after")
    def _top_k(self) -> MoefyConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} is more than num_experts={self.num_experts}")
        if self.evaluate and self.evaluate.top_k and not all(1 <= e <= self.num_experts for e in self.evaluate.top_k):
            raise ValueError(f"evaluate.top_k values must be within 1..num_experts={self.num_experts}")
        return self

    def sweep(self) -> list[int]:
        """The experts-per-token values of the quality table: k, k/2, k/4 ... down to 1 by default."""
        if self.evaluate and self.evaluate.top_k:
            return sorted(set(self.evaluate.top_k), reverse=True)
        values, e = [], self.num_experts
        while e >= 1 and len(values) < 3:
            values.append(e)
            e //= 2
        return values
