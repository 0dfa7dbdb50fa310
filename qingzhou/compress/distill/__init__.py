"""Knowledge distillation: losses that plug into the fine-tuning loop (teacher -> student), and a
disk cache of the teacher's top-k logits. Heavy names resolve lazily (configs import without torch)."""
from __future__ import annotations

from qingzhou._lazy import lazy_getattr

_LAZY = {
    "DistillLoss": "qingzhou.compress.distill.losses",
    "divergence": "qingzhou.compress.distill.losses",
    "topk_divergence": "qingzhou.compress.distill.losses",
    "DistillLossConfig": "qingzhou.compress.distill.config",
    "cache_teacher_topk": "qingzhou.compress.distill.teacher_cache",
    "TeacherCache": "qingzhou.compress.distill.teacher_cache",
    "HiddenMatchConfig": "qingzhou.compress.distill.config",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
