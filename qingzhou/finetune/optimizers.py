"""Optimizers the training loop can build, by name: torch's AdamW/SGD and bitsandbytes' 8-bit family.

8-bit Adam keeps both moment estimates block-quantised to 8 bits (Dettmers et al. 2022), cutting
optimizer memory ~4x for full fine-tuning; bitsandbytes keeps tensors under 4096 elements (most
LoRA factors) in 32 bits, so for adapters it mostly matters for large ranks or `modules_to_save`.
Paged variants move optimizer state to host memory when the GPU runs short (CUDA unified memory);
on CPU bitsandbytes runs them unpaged. This module is torch-free at import: configs validate
the name before torch loads.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qingzhou.registry import Registry

OptimizerFactory = Callable[[list[dict[str, Any]], Any], Any]
# name -> factory(param_groups, cfg) -> torch.optim.Optimizer
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
register_optimizer = OPTIMIZERS.register


def build_optimizer(groups: list[dict[str, Any]], cfg: Any) -> Any:
    """The optimizer `cfg.optimizer` over `groups` (names were validated with the config)."""
    return OPTIMIZERS.get(cfg.optimizer, where="optimizer").obj(groups, cfg)


@register_optimizer("adamw")
def adamw(groups: list[dict[str, Any]], cfg: Any) -> Any:
    import torch

    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.adam_betas)


@register_optimizer("sgd")
def sgd(groups: list[dict[str, Any]], cfg: Any) -> Any:
    import torch

    return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.9)


def _bnb_optimizer(class_name: str) -> OptimizerFactory:
    def factory(groups: list[dict[str, Any]], cfg: Any) -> Any:
        from qingzhou.llm.devices import require_bitsandbytes

        bnb = require_bitsandbytes(f"optimizer '{cfg.optimizer}'")
        kwargs: dict[str, Any] = {"lr": cfg.learning_rate}
        if "Lion" not in class_name:
            kwargs["betas"] = cfg.adam_betas
        return getattr(bnb.optim, class_name)(groups, **kwargs)

    return factory


for _name, _cls in {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                    "paged_adamw_32bit": "PagedAdamW32bit", "lion_8bit": "Lion8bit",
                    "paged_lion_8bit": "PagedLion8bit"}.items():
    register_optimizer(_name)(_bnb_optimizer(_cls))
