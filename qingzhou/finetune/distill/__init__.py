"""Knowledge distillation: `distill(student, teacher, tokenizer, cfg, data)` on the one fine-tuning
loop, its losses (teacher -> student) and a disk cache of the teacher's top-k logits. Heavy names
resolve lazily (configs import without torch)."""
from __future__ import annotations

from qingzhou._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".api": "distill DistillReport",
    ".config": "DistillConfig parse_distill_config DistillLossConfig HiddenMatchConfig",
    ".objective": "DistillObjective held_out_kl",
    ".losses": "DistillLoss divergence topk_divergence",
    ".teacher_cache": "build_teacher_cache open_or_build TeacherCache",
})
