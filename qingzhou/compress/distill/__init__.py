"""Knowledge distillation: `distill(student, teacher, tokenizer, cfg, data)` on the one fine-tuning
loop, its losses (teacher -> student) and a disk cache of the teacher's top-k logits. Heavy names
resolve lazily (configs import without torch)."""
from __future__ import annotations

from qingzhou._lazy import lazy_getattr

_LAZY = {
    "distill": "qingzhou.compress.distill.api",
    "DistillReport": "qingzhou.compress.distill.api",
    "DistillConfig": "qingzhou.compress.distill.config",
    "parse_distill_config": "qingzhou.compress.distill.config",
    "DistillObjective": "qingzhou.compress.distill.objective",
    "held_out_kl": "qingzhou.compress.distill.objective",
    "DistillLoss": "qingzhou.compress.distill.losses",
    "divergence": "qingzhou.compress.distill.losses",
    "topk_divergence": "qingzhou.compress.distill.losses",
    "DistillLossConfig": "qingzhou.compress.distill.config",
    "build_teacher_cache": "qingzhou.compress.distill.teacher_cache",
    "open_or_build": "qingzhou.compress.distill.teacher_cache",
    "TeacherCache": "qingzhou.compress.distill.teacher_cache",
    "HiddenMatchConfig": "qingzhou.compress.distill.config",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
