"""`distill(student, teacher, tokenizer, cfg, data)`: the one public entry point the recipe stage
and the CLI call.

Distillation is the fine-tuning loop with another loss (`finetune(loss_fn=DistillObjective)`), so
every method of the loop is available for the student (full retraining of a pruned or structurally
pruned model, LoRA on a frozen quantized base, ...), as are mixed precision, gradient accumulation,
multi-process training and checkpoint/resume. What distillation adds:

* the teacher's top-k logits over the training rows are computed once and cached on disk, keyed by
  (rows, teacher weights, k), so later epochs, resumed runs and reruns never run the teacher again;
* a pruned student stays pruned (`keep_sparsity`: gradients of pruned weights are masked);
* the report measures what distillation is for: the student's KL to the teacher on held-out rows,
  before and after.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qingzhou.errors import RecipeError
from qingzhou.finetune.distill.config import DistillConfig, parse_distill_config


@dataclass
class DistillReport:
    config: dict[str, Any]
    finetune: Any  # FinetuneResult of the loop run
    teacher: dict[str, Any] = field(default_factory=dict)  # mode (cache | live) and cache info
    teacher_forwards: dict[str, int] = field(default_factory=dict)  # per phase: cache, train, eval
    kl_before: float | None = None
    kl_after: float | None = None
    parameters: int = 0
    sparsity: dict[str, Any] = field(default_factory=dict)  # pruned matrices kept pruned
    seconds: float = 0.0

    @property
    def model(self) -> Any:
        """The trained student (a peft model for adapter methods), in memory."""
        return self.finetune.model

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "finetune"}
        out["finetune"] = self.finetune.to_dict()
        return out

    def summary(self) -> dict[str, Any]:
        """Headline numbers (metrics.json, the CLI table)."""
        ft = self.finetune
        return {"method": ft.method, "divergence": self.config["divergence"], "temperature": self.config["temperature"],
                "kd_ratio": self.config["kd_ratio"], "teacher": self.teacher.get("mode"), "steps": ft.steps,
                "kl_before": _round(self.kl_before), "kl_after": _round(self.kl_after),
                "eval_loss_before": _round(ft.eval_loss_before), "eval_loss_after": _round(ft.eval_loss_after),
                "train_tokens": ft.train_tokens, "tokens_per_s": round(ft.tokens_per_s, 1),
                "teacher_forwards": sum(self.teacher_forwards.values()), "parameters": self.parameters,
                "artifact": ft.artifact, "seconds": round(self.seconds, 2)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


@contextmanager
def _count_calls(module: nn.Module) -> Iterator[list[int]]:
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def _check_pair(student: nn.Module, teacher: nn.Module) -> None:
    s_vocab = student.get_output_embeddings().weight.shape[0] if student.get_output_embeddings() is not None else None
    t_vocab = teacher.get_output_embeddings().weight.shape[0] if teacher.get_output_embeddings() is not None else None
    if s_vocab != t_vocab:
        raise RecipeError(f"the student's vocabulary ({s_vocab}) differs from the teacher's ({t_vocab}).",
                          where="teacher", hint="Logit distillation needs one tokenizer for both models.")
    if student is teacher:
        raise RecipeError("the teacher is the student itself.", where="teacher",
                          hint="Pass a separate copy (e.g. load the base model again).")


def distill(student: nn.Module, teacher: nn.Module, tokenizer: Any, cfg: DistillConfig | dict[str, Any],
            data: Any, *, output_dir: str | Path, resume: bool = True,
            callbacks: list[Callable[[int, dict[str, Any]], None]] | None = None,
            base_source: str | None = None, checkpoint_dir: str | Path | None = None,
            overwrite: bool = False) -> DistillReport:
    """Train `student` towards `teacher` on `data` with the one fine-tuning loop.

    `cfg`: a `DistillConfig` or a dict, nested (`train: {method: full, ...}`) or flat (keys that are
    not distillation settings are the loop's). `data`: anything `finetune` takes (source string,
    DataConfig, rows, PreparedData). The student (or its adapter) is saved under `output_dir` like a
    fine-tune; `distill.json` there holds the report. Returns a `DistillReport` (`.model` is the
    trained student). `checkpoint_dir` and `overwrite` are the fine-tuning loop's (where
    checkpoints go; whether an earlier output folder is started over).
    """
    from accelerate import PartialState

    from qingzhou.finetune.distill.losses import DistillLoss
    from qingzhou.finetune.distill.objective import (
        DistillObjective,
        held_out_kl,
        keep_zeros,
        pruned_masks,
    )
    from qingzhou.finetune.distill.teacher_cache import open_or_build
    from qingzhou.finetune.checkpoint import checkpoint_root
    from qingzhou.finetune.loop import claim_output_dir, finetune, prepare_training_data
    from qingzhou.finetune.methods import parse_finetune_config
    from qingzhou.io import atomic_write_json
    from qingzhou.llm.devices import keep_bnb_4bit_layout

    t0 = time.perf_counter()
    cfg = parse_distill_config(cfg)
    train_cfg = parse_finetune_config(cfg.train)
    _check_pair(student, teacher)
    for model in (student, teacher):  # 4-bit layers: compute dtype kept, the student trainable after held_out_kl
        keep_bnb_4bit_layout(model)
    # before the teacher cache is built: a refused output folder should fail in a second
    claim_output_dir(Path(output_dir), Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint_root(output_dir),
                     resume=resume, overwrite=overwrite)
    # only a multi-process launch needs accelerate's state here; creating it early in a single
    # process could pin a device choice before the loop's Accelerator(cpu=...) makes its own
    state = PartialState() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    main = state is None or state.is_main_process
    if cfg.hidden is not None and state is not None:
        raise RecipeError("hidden-state matching trains its projections on one process only.", where="hidden",
                          hint="Run hidden-state distillation in a single process, or drop `hidden`.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    prepared = prepare_training_data(data, tokenizer, train_cfg.seed)
    teacher.eval()
    trainable_teacher = [p for p in teacher.parameters() if p.requires_grad]
    teacher.requires_grad_(False)  # restored at the end: the caller's teacher is only borrowed
    loss = DistillLoss.for_models(student, teacher, cfg) if cfg.hidden is not None else DistillLoss(cfg)

    forwards: dict[str, int] = {}
    cache, teacher_info = None, {"mode": "live"}
    with _count_calls(teacher) as calls:
        if cfg.top_k is not None and cfg.hidden is None:  # hidden states are too large to cache: live teacher
            with state.main_process_first() if state is not None else nullcontext():
                cache, info = open_or_build(teacher, prepared.train, prepared.fingerprint, k=cfg.top_k,
                                            cache_dir=cfg.cache_dir, batch_size=cfg.teacher_batch_size, pad_id=pad_id,
                                            packed=prepared.packed, progress=train_cfg.progress and main)
            teacher_info = {"mode": "cache", **info.to_dict()}
        forwards["cache"] = calls[0]
        kl_before = held_out_kl(student, teacher, prepared.eval, pad_id, max_rows=cfg.kl_rows)
        forwards["eval"] = calls[0] - forwards["cache"]
        objective = DistillObjective(loss, teacher=teacher, cache=cache, pad_id=pad_id)
        masks = pruned_masks(student) if cfg.keep_sparsity and train_cfg.method == "full" else {}
        with keep_zeros(student, masks):
            result = finetune(student, tokenizer, prepared, train_cfg, output_dir=output_dir, resume=resume,
                              callbacks=callbacks, base_source=base_source, loss_fn=objective,
                              checkpoint_dir=checkpoint_dir, overwrite=overwrite)
        forwards["train"] = objective.teacher_forwards
        kl_after = held_out_kl(result.model, teacher, prepared.eval, pad_id, max_rows=cfg.kl_rows)
        forwards["eval"] = calls[0] - forwards["cache"] - forwards["train"]

    for p in trainable_teacher:
        p.requires_grad_(True)
    params = dict(result.model.named_parameters())
    sparsity = {}
    if masks:  # measured, not assumed
        kept = sum(int((params[n][~m.to(params[n].device)] == 0).all()) for n, m in masks.items())
        sparsity = {"pruned_matrices": len(masks), "kept_pruned": kept,
                    "zeros": sum(int((~m).sum()) for m in masks.values())}
    report = DistillReport(config=cfg.model_dump(mode="json"), finetune=result, teacher=teacher_info,
                           teacher_forwards=forwards, kl_before=kl_before, kl_after=kl_after,
                           parameters=sum(p.numel() for p in {id(p): p for p in student.parameters()}.values()),
                           sparsity=sparsity, seconds=time.perf_counter() - t0)
    if main:
        record = report.to_dict()  # paths relative to the file's own folder (it may be renamed, as recipe stages are)
        record["finetune"].update(output_dir=".", artifact_dir=result.artifact)
        atomic_write_json(Path(output_dir) / "distill.json", record)
    return report


__all__ = ["DistillReport", "distill"]
