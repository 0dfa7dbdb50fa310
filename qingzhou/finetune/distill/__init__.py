"""Knowledge distillation: `distill(student, teacher, tokenizer, cfg, data)` on the one fine-tuning
loop, its losses (teacher -> student) and a disk cache of the teacher's top-k logits. Heavy names
resolve lazily (configs import without torch)."""
from __future__ import annotations

from qingzhou._lazy import lazy_getattr

_LAZY = {
    "distill": "qingzhou.finetune.distill.api",
    "DistillReport": "qingzhou.finetune.distill.api",
    "DistillConfig": "qingzhou.finetune.distill.config",
    "parse_distill_config": "qingzhou.finetune.distill.config",
    "DistillObjective": "qingzhou.finetune.distill.objective",
    "held_out_kl": "qingzhou.finetune.distill.objective",
    "DistillLoss": "qingzhou.finetune.distill.losses",
    "divergence": "qingzhou.finetune.distill.losses",
    "topk_divergence": "qingzhou.finetune.distill.losses",
    "DistillLossConfig": "qingzhou.finetune.distill.config",
    "build_teacher_cache": "qingzhou.finetune.distill.teacher_cache",
    "open_or_build": "qingzhou.finetune.distill.teacher_cache",
    "TeacherCache": "qingzhou.finetune.distill.teacher_cache",
    "HiddenMatchConfig": "qingzhou.finetune.distill.config",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
