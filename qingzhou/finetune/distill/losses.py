"""Distillation losses, shaped to plug into the one fine-tuning loop as
`loss_fn(student_outputs, teacher_outputs, batch) -> scalar tensor`.

* Logit distillation with a temperature T and Hinton's T^2 factor (keeps gradient magnitudes
  comparable across temperatures): forward KL(p_T || p_S) (mean-seeking, the classic choice),
  reverse KL(p_S || p_T) (mode-seeking, MiniLLM) or Jensen-Shannon (symmetric and bounded,
  stable when the student is far from the teacher, e.g. right after heavy pruning).
* Optionally mixed with the ordinary next-token cross-entropy on the labels (`kd_ratio`,
  torchtune's name; `alpha` would clash with LoRA's in a flat recipe stage).
* Optional hidden-state matching (TinyBERT / Minitron style): each chosen student layer is mapped
  by a learned linear projection onto the teacher's width and pulled towards the teacher layer at
  the same relative depth with MSE; the projections are parameters of the loss module, so add
  `loss_fn.parameters()` to the optimizer.
* The teacher may be given as cached top-k logits (`{"topk_values", "topk_indices"}`) instead of
  full logits, so epochs do not rerun it (see `teacher_cache.py`).

Only positions that are trained on count: where `batch["labels"]` (shifted) is not -100, else where
`batch["attention_mask"]` is 1, else all positions.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qingzhou.finetune.distill.config import DistillLossConfig

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- divergences


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities over the last dim (0 * log 0 = 0)."""
    return torch.sum(torch.exp(log_p) * (log_p - log_q), dim=-1)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
               temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence between softened student and teacher distributions, times T^2."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _divergence(log_s, log_t, kind) * temperature**2


def _divergence(log_s: torch.Tensor, log_t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "forward_kl":
        return _kl(log_t, log_s)
    if kind == "reverse_kl":
        return _kl(log_s, log_t)
    if kind == "js":
        log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - torch.log(torch.tensor(2.0))
        return 0.5 * _kl(log_t, log_m) + 0.5 * _kl(log_s, log_m)
    raise ValueError(f"unknown divergence {kind!r}")


def topk_divergence(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, kind: str,
                    temperature: float = 1.0) -> torch.Tensor:
    """Divergence against a teacher known only by its top-k logits (renormalised over the k).

    Forward KL uses the student's full-vocabulary log-probabilities at those k tokens, so student
    mass outside the teacher's top-k is still penalised; reverse KL and JS need both distributions
    on one support, so the student is renormalised over the k tokens too.
    """
    log_t = F.log_softmax(values.float() / temperature, dim=-1)
    log_s_full = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_s = torch.gather(log_s_full, -1, indices.long())
    if kind != "forward_kl":
        log_s = log_s - torch.logsumexp(log_s, dim=-1, keepdim=True)
    return _divergence(log_s, log_t, kind) * temperature**2


# ----------------------------------------------------------------------------- the loss module


def _get(outputs: Any, key: str) -> Any:
    return outputs.get(key) if isinstance(outputs, dict) else getattr(outputs, key, None)


def position_mask(batch: dict[str, Any], shape: torch.Size) -> tuple[torch.Tensor, bool]:
    """(mask over logits positions [B, T'], shifted) - shifted=True means logits[:, :-1] are used."""
    labels = batch.get("labels")
    if labels is not None:
        return labels[:, 1:] != IGNORE_INDEX, True
    attn = batch.get("attention_mask")
    if attn is not None:
        return attn.bool(), False
    return torch.ones(shape[:2], dtype=torch.bool), False


class DistillLoss(nn.Module):
    """`loss_fn(student_outputs, teacher_outputs, batch)`; outputs are HF model outputs or dicts with
    `logits` (and `hidden_states` when hidden matching is on; teacher may instead carry
    `topk_values`/`topk_indices`). `last` holds the parts of the latest call, for logging."""

    def __init__(self, cfg: DistillLossConfig | dict[str, Any] | None = None, *,
                 student_hidden: int | None = None, teacher_hidden: int | None = None,
                 student_layers: int | None = None, teacher_layers: int | None = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, DistillLossConfig) else DistillLossConfig.model_validate(cfg or {})
        self.last: dict[str, float] = {}
        self.projections = nn.ModuleDict()
        self.layer_map: dict[int, int] = {}
        h = self.cfg.hidden
        if h is not None:
            if None in (student_hidden, teacher_hidden, student_layers, teacher_layers):
                raise ValueError("hidden-state matching needs student/teacher hidden sizes and layer counts")
            chosen = h.layers or list(range(1, student_layers + 1))
            for s in chosen:  # same relative depth; hidden_states[0] is the embedding output
                self.layer_map[s] = round(s * teacher_layers / student_layers)
                proj = nn.Linear(student_hidden, teacher_hidden, bias=False)
                if student_hidden == teacher_hidden:
                    nn.init.eye_(proj.weight)
                self.projections[str(s)] = proj

    @classmethod
    def for_models(cls, student: nn.Module, teacher: nn.Module, cfg: DistillLossConfig | dict | None = None) -> DistillLoss:
        """Build the loss with hidden sizes and depths read from the two models' configs."""
        sc, tc = student.config, teacher.config
        return cls(cfg, student_hidden=sc.hidden_size, teacher_hidden=tc.hidden_size,
                   student_layers=sc.num_hidden_layers, teacher_layers=tc.num_hidden_layers)

    def forward(self, student_outputs: Any, teacher_outputs: Any, batch: dict[str, Any]) -> torch.Tensor:
        cfg = self.cfg
        s_logits = _get(student_outputs, "logits")
        mask, shifted = position_mask(batch, s_logits.shape)
        mask = mask.to(s_logits.device)
        cut = (lambda x: x[:, :-1]) if shifted else (lambda x: x)
        s = cut(s_logits)[mask]
        values = _get(teacher_outputs, "topk_values")
        if values is not None:
            idx = _get(teacher_outputs, "topk_indices")
            kd = topk_divergence(s, cut(values.to(s.device))[mask], cut(idx.to(s.device))[mask],
                                 cfg.divergence, cfg.temperature)
        else:
            t = cut(_get(teacher_outputs, "logits").to(s.device))[mask]
            kd = divergence(s, t.detach(), cfg.divergence, cfg.temperature)
        kd = kd.mean() if kd.numel() else s_logits.sum() * 0
        loss = cfg.kd_ratio * kd
        self.last = {"kd": float(kd.detach())}
        if cfg.kd_ratio < 1:
            ce = self._cross_entropy(student_outputs, s_logits, batch)
            loss = loss + (1 - cfg.kd_ratio) * ce
            self.last["ce"] = float(ce.detach())
        if cfg.hidden is not None and cfg.hidden.weight > 0:
            hid = self._hidden_loss(student_outputs, teacher_outputs, batch)
            loss = loss + cfg.hidden.weight * hid
            self.last["hidden"] = float(hid.detach())
        self.last["loss"] = float(loss.detach())
        return loss

    @staticmethod
    def _cross_entropy(student_outputs: Any, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("kd_ratio < 1 mixes in cross-entropy, which needs batch['labels']")
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX)

    def _hidden_loss(self, student_outputs: Any, teacher_outputs: Any, batch: dict[str, Any]) -> torch.Tensor:
        s_states, t_states = _get(student_outputs, "hidden_states"), _get(teacher_outputs, "hidden_states")
        if s_states is None or t_states is None:
            raise ValueError("hidden-state matching needs output_hidden_states=True on both models")
        attn = batch.get("attention_mask")
        total = 0.0
        for s_idx, t_idx in self.layer_map.items():
            sh = self.projections[str(s_idx)](s_states[s_idx].float())
            th = t_states[t_idx].float().detach().to(sh.device)
            err = (sh - th).pow(2).mean(dim=-1)
            if attn is not None:
                m = attn.bool().to(err.device)
                err = err[m]
            # normalise by the teacher's scale so the term does not depend on activation size
            total = total + err.mean() / th.pow(2).mean().clamp(min=1e-8)
        return total / max(len(self.layer_map), 1)
