"""`FinetuneConfig`: the training hyper-parameters shared by every method.

Each method subclasses it with its own `method: Literal[...]` and knobs (see methods.py), so a
YAML stage or CLI call stays flat (`method: lora, r: 16, max_steps: 60`) while unknown keys for
that method are still errors.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qingzhou.errors import RecipeError


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    method: str
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(4, gt=0, description="rows per micro-batch per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: str = Field("adamw", description="adamw | sgd | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit | "
                                                "lion_8bit | paged_lion_8bit (the last five: bitsandbytes)")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    fused_ops: bool = Field(False, description="SwiGLU/RMSNorm that keep fewer activations for backward (one "
                                                "intermediate- and two hidden-size tensors per token and layer less); "
                                                "measured about 15% slower on CPU, so off by default")
    eval_every: int = Field(0, ge=0, description="steps between eval-loss measurements (0: only before and after)")
    eval_batches: int | None = Field(None, gt=0, description="cap the eval batches (None: whole held-out split)")
    save_every: int = Field(0, ge=0, description="steps between resumable checkpoints (0: none)")
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    seed: int = 0
    progress: bool = True

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        from qingzhou.errors import did_you_mean
        from qingzhou.finetune.optimizers import OPTIMIZERS

        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{v}'. {did_you_mean(v, OPTIMIZERS)}")
        return v


def parse_finetune_config(data: dict[str, Any] | FinetuneConfig) -> FinetuneConfig:
    """Validate a dict against the config class of its `method` (default lora)."""
    from pydantic import ValidationError

    from qingzhou.errors import did_you_mean
    from qingzhou.finetune.methods import METHODS

    if isinstance(data, FinetuneConfig):
        return data
    method = data.get("method", "lora")
    if not isinstance(method, str) or method not in METHODS:
        raise RecipeError(f"unknown fine-tuning method '{method}'.", where="method", hint=did_you_mean(str(method), METHODS))
    try:
        return METHODS[method].config.model_validate({**data, "method": method})
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{first['msg']}.", where=key or "finetune", hint=f"({e.error_count()} problem(s) in the {method} config)") from None
