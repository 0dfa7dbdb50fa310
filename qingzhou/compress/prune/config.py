"""Settings shared by every pruner (torch-free, so recipes validate before torch loads).

Each method's own config subclasses `PruneConfig` in the method's file and adds a
`method: Literal[...]` discriminator plus its knobs. A sparsity pattern is either unstructured
(`sparsity: 0.5`) or semi-structured (`nm: "2:4"`: at most N non-zeros in every M consecutive
input weights of a row, NVIDIA's convention; for 2:4 and 4:8 it is also "N of M pruned").
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qingzhou.compress.settings import LayerwiseSettings, ModuleRule, check_regex


def parse_nm(v: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep at most 2 of every 4 consecutive weights of a row."""
    if v is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", v)
    if not m:
        raise ValueError(f"nm must look like '2:4' (N non-zeros of every M weights), got {v!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"nm {v!r}: need 0 < N < M")
    return n, mm


class PruneOverride(ModuleRule):
    """Per-module sparsity (see `ModuleRule` for how rules match)."""

    sparsity: float | None = Field(None, ge=0, lt=1)
    nm: str | None = None

    @field_validator("nm")
    @classmethod
    def _nm(cls, v: str | None) -> str | None:
        parse_nm(v)
        return v


class OWLConfig(BaseModel):
    """Outlier-weighted layerwise sparsity (Yin et al. 2024, OWL): layers holding more outlier
    weights (Wanda score > `threshold` x the layer mean) keep more of them. The per-layer
    sparsities average to the global one and stay within +-`spread` of it."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(5.0, gt=0, description="M: a weight is an outlier if its score > M x layer mean")
    spread: float = Field(0.08, ge=0, lt=0.5, description="lambda: max deviation from the global sparsity")


class PruneConfig(BaseModel):
    """Common settings. Only `nn.Linear` modules inside the decoder layers are pruned: `lm_head`
    and the embeddings are never touched (they are tied in many small models and are the most
    sensitive weights); `skip` removes more, by regex on the full module name."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    method: str
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights set to zero (unstructured)")
    nm: str | None = Field(None, description="semi-structured pattern 'N:M', e.g. '2:4' (overrides sparsity)")
    skip: list[str] = Field(default_factory=lambda: [r"lm_head", r"embed"],
                            description="regexes of module names left dense")
    overrides: list[PruneOverride] = Field(default_factory=list)
    owl: OWLConfig | None = Field(None, description="non-uniform per-layer sparsity (unstructured only)")

    @field_validator("skip")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return [check_regex(p) for p in v]

    @field_validator("nm")
    @classmethod
    def _nm(cls, v: str | None) -> str | None:
        parse_nm(v)
        return v

    @model_validator(mode="after")
    def _owl_unstructured(self) -> PruneConfig:
        if self.owl is not None and self.nm is not None:
            raise ValueError("owl sets a sparsity per layer; it does not apply to an N:M pattern")
        return self


class CalibratedPruneConfig(LayerwiseSettings, PruneConfig):
    """Settings of methods that walk the decoder layers with calibration data (Wanda, SparseGPT,
    and any method with `owl`)."""

    true_sequential: bool = Field(True, description="prune attention before the MLP within each layer, "
                                                    "each group seeing the already-pruned inputs")
