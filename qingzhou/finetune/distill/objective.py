"""The distillation objective as the fine-tuning loop's loss hook, and what keeps a pruned
student pruned while it trains.

`DistillObjective(model, batch) -> (summed loss, target tokens)` is what `finetune(loss_fn=...)`
calls in place of cross-entropy: it runs the student, takes the teacher's view of the same batch
(cached top-k logits, or a live teacher forward when hidden states are matched or no cache is
wanted) and applies `DistillLoss`. The loop divides by the step's target-token count, so the loss
is returned as a per-token mean times that count.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qingzhou.finetune.distill.fused_kl import fused_divergence_supported, linear_divergence
from qingzhou.finetune.distill.losses import IGNORE_INDEX, DistillLoss, divergence
from qingzhou.finetune.distill.teacher_cache import TeacherCache
from qingzhou.finetune.fused_loss import linear_cross_entropy
from qingzhou.llm.head import head_bypassed


class DistillObjective(nn.Module):
    """Loss hook for the one loop. Its trainable parameters are the loss's (hidden-state
    projections); the teacher is held outside the module tree so it is never trained or saved."""

    def __init__(self, loss: DistillLoss, *, teacher: nn.Module | None = None, cache: TeacherCache | None = None,
                 pad_id: int = 0):
        super().__init__()
        if teacher is None and cache is None:
            raise ValueError("DistillObjective needs a teacher or a teacher cache")
        self.loss = loss
        self._teacher = (teacher,)  # a tuple: not registered as a submodule
        self.cache = cache
        self.pad_id = pad_id
        self.teacher_forwards = 0

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        hidden = self.loss.cfg.hidden is not None
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        width = batch["labels"].shape[1]
        if (not hidden and self.cache is None
                and fused_divergence_supported(model, self.teacher, self.loss.cfg.divergence)):
            return self._fused(model, inputs, batch["labels"])
        out = model(**inputs, use_cache=False, output_hidden_states=hidden)
        # prompt tuning prepends virtual tokens: keep the positions that line up with the labels
        student = {"logits": out.logits[:, -width:]}
        if hidden:
            student["hidden_states"] = tuple(h[:, -width:] for h in out.hidden_states)
        teacher_out = self._teacher_outputs(inputs, hidden, batch)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return self.loss(student, teacher_out, batch) * n, n

    def _fused(self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The live-teacher logit loss with both heads applied in row chunks (`fused_kl.py`): the
        same numbers as `DistillLoss`, without [batch, length, vocab] logits for either model."""
        cfg = self.loss.cfg
        width = labels.shape[1]
        with head_bypassed(model) as head:
            out = model(**inputs, use_cache=False).logits[:, -width:]
        with head_bypassed(self.teacher) as t_head:
            t_out = self._live_teacher(inputs, False).logits[:, -width:]
        mask = (labels[:, 1:] != IGNORE_INDEX).to(out.device)
        n = int(mask.sum())
        if n == 0:
            self.loss.last = {"kd": 0.0, "loss": 0.0}
            return out.sum() * 0, 0
        kd = linear_divergence(out[:, :-1][mask], head.weight, head.bias, t_out[:, :-1][mask].to(out.device),
                               t_head.weight, t_head.bias, cfg.divergence, cfg.temperature)
        total = cfg.kd_ratio * kd
        self.loss.last = {"kd": float(kd.detach()) / n}
        if cfg.kd_ratio < 1:
            ce = linear_cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), head.weight, head.bias,
                                      labels[:, 1:].reshape(-1).to(out.device), IGNORE_INDEX)
            total = total + (1 - cfg.kd_ratio) * ce
            self.loss.last["ce"] = float(ce.detach()) / n
        self.loss.last["loss"] = float(total.detach()) / n
        return total, n

    def _teacher_outputs(self, inputs: dict[str, Any], hidden: bool, batch: dict[str, Any]) -> Any:
        if self.cache is not None and not hidden:
            return self.cache.for_batch(batch, self.pad_id)
        return self._live_teacher(inputs, hidden)

    def _live_teacher(self, inputs: dict[str, Any], hidden: bool) -> Any:
        teacher = self.teacher
        device = inputs["input_ids"].device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher.eval()
        self.teacher_forwards += 1
        with torch.no_grad():
            return teacher(**inputs, use_cache=False, output_hidden_states=hidden)


def pruned_masks(model: nn.Module, min_sparsity: float = 0.05) -> dict[str, torch.Tensor]:
    """Non-zero masks of the matrices a pruner thinned out (at least `min_sparsity` exact zeros;
    trained dense weights have essentially none)."""
    masks = {}
    for name, p in model.named_parameters():
        if p.ndim == 2 and p.is_floating_point() and float((p == 0).float().mean()) >= min_sparsity:
            masks[name] = p.detach() != 0
    return masks


@contextmanager
def keep_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Mask the gradients of pruned weights while training: with zero gradients Adam's moments
    stay zero and decoupled weight decay only rescales, so pruned weights stay exactly zero."""
    params = dict(model.named_parameters())
    handles = []
    for name, mask in masks.items():
        p = params[name].requires_grad_(True)  # called for full training, which trains it anyway
        handles.append(p.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def held_out_kl(student: nn.Module, teacher: nn.Module, rows: list[Any], pad_id: int, *,
                batch_size: int = 8, max_rows: int | None = 64) -> float | None:
    """Token-weighted forward KL(teacher || student) at temperature 1 over the labelled positions
    of held-out rows: the number distillation is meant to bring down. Where both heads are plain
    linears the heads run in row chunks (`fused_kl.py`), so a 262k vocabulary costs no more memory."""
    from contextlib import ExitStack

    from qingzhou.data.packing import collate

    rows = rows[:max_rows] if max_rows is not None else rows
    if not rows:
        return None
    device = next(student.parameters()).device
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    fused = fused_divergence_supported(student, teacher, "forward_kl")
    total, count = 0.0, 0
    with ExitStack() as stack:
        heads = [stack.enter_context(head_bypassed(m)) for m in (student, teacher)] if fused else []
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id, packed=False).items()}
            labels = batch.pop("labels")
            s = student(**batch, use_cache=False).logits[:, -labels.shape[1]:]
            t = teacher.to(device)(**batch, use_cache=False).logits
            mask = labels[:, 1:] != IGNORE_INDEX
            s, t = s[:, :-1][mask], t[:, :-1][mask]
            if fused:  # s and t are the final hidden states
                total += float(linear_divergence(s, heads[0].weight, heads[0].bias, t, heads[1].weight,
                                                 heads[1].bias, "forward_kl"))
            else:
                total += float(divergence(s, t, "forward_kl").sum())
            count += int(mask.sum())
    student.train(was[0])
    teacher.train(was[1])
    return total / count if count else None
