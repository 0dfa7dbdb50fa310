"""Distillation settings (torch-free, so recipes validate before torch loads)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class HiddenMatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, ge=0, description="weight of the hidden-state term")
    layers: list[int] | None = Field(None, description="student layers matched (1-based hidden_states "
                                                       "indices); default: every student layer")


class DistillLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    divergence: Literal["forward_kl", "reverse_kl", "js"] = "forward_kl"
    temperature: float = Field(2.0, gt=0)
    kd_ratio: float = Field(0.5, ge=0, le=1, description="weight of the distillation term; 1 - kd_ratio goes to "
                                                       "cross-entropy on the labels")
    hidden: HiddenMatchConfig | None = None


class DistillConfig(DistillLossConfig):
    """What `distill()` takes: the loss settings above, how the teacher is consulted, and the
    training settings of the one fine-tuning loop (`train`: any finetune method config; `full`
    retrains every weight of a pruned student, `lora` adapts a frozen (e.g. quantized) base)."""

    top_k: int | None = Field(64, ge=1, description="cache the teacher's top-k logits on disk once and "
                                                    "replay them every epoch; None: run the teacher live "
                                                    "every step (exact full-vocabulary targets)")
    cache_dir: str | None = Field(None, description="folder holding teacher caches (default: the qingzhou "
                                                    "cache, ~/.cache/qingzhou/teacher)")
    teacher_batch_size: int = Field(8, ge=1, description="rows per teacher forward when building the cache")
    keep_sparsity: bool = Field(True, description="full training keeps a pruned student's zeros zero "
                                                  "(gradients masked), so distillation does not undo pruning")
    kl_rows: int = Field(32, ge=0, description="held-out rows on which the student's KL to the teacher is "
                                               "measured before and after (0: skip)")
    train: Any = Field(default_factory=lambda: {"method": "full"},
                       description="fine-tuning settings (method, learning_rate, max_steps, ...): validated "
                                   "into that method's typed FinetuneConfig")

    @field_validator("train", mode="before")
    @classmethod
    def _valid_train(cls, value: Any) -> Any:
        from qingzhou.errors import RecipeError
        from qingzhou.finetune.methods import parse_finetune_config

        if isinstance(value, BaseModel):
            return value
        try:
            return parse_finetune_config({"method": "full", **value})
        except RecipeError as e:
            raise ValueError(f"train.{e.where}: {e.message} {e.hint or ''}".strip()) from None


def parse_distill_config(data: DistillConfig | dict[str, Any]) -> DistillConfig:
    """Validate a distillation config given nested (`train: {...}`) or flat: keys that are not
    distillation settings are training settings, so a recipe stage or CLI call can write
    `method: full, learning_rate: 1e-4, temperature: 2` side by side."""
    if isinstance(data, DistillConfig):
        return data
    own = set(DistillConfig.model_fields)
    if not isinstance(data.get("train", {}), dict):
        from qingzhou.errors import RecipeError

        raise RecipeError(f"`train` must be a mapping of training settings, got {data['train']!r}.", where="train")
    train = {**data.get("train", {}), **{k: v for k, v in data.items() if k not in own}}
    return DistillConfig.model_validate({**{k: v for k, v in data.items() if k in own}, "train": train})
