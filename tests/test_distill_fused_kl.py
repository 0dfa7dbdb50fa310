"""The chunked distillation divergence (`fused_kl.py`): the same loss and gradients as the plain
full-logits path, no [batch, length, vocab] logits in the fused objective, and the held-out KL."""
from __future__ import annotations

import copy

import pytest
import torch

from qingzhou.data.packing import Example
from qingzhou.finetune import fused_loss
from qingzhou.finetune.distill import DistillLoss, divergence
from qingzhou.finetune.distill.fused_kl import fused_divergence_supported, linear_divergence
from qingzhou.finetune.distill.objective import DistillObjective, held_out_kl
from qingzhou.finetune.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_linear_divergence_equals_the_plain_divergence_and_its_gradients(kind, temperature, monkeypatch):
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk: the chunk seams are exercised
    monkeypatch.setattr("qingzhou.finetune.distill.fused_kl.CHUNK_ELEMENTS", 3 * 50)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = (torch.randn(50, 8, generator=g) * 0.5).requires_grad_()
    b = torch.randn(50, generator=g).requires_grad_()
    th, tw, tb = torch.randn(10, 6, generator=g), torch.randn(50, 6, generator=g) * 0.7, torch.randn(50, generator=g)
    fused = linear_divergence(h, w, b, th, tw, tb, kind, temperature)
    fused.backward()
    got = (h.grad.clone(), w.grad.clone(), b.grad.clone())
    for p in (h, w, b):
        p.grad = None
    plain = divergence(h @ w.T + b, th @ tw.T + tb, kind, temperature).sum()
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, e in zip(got, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    assert float(fused.detach()) > 0
    # the teacher against itself: zero divergence and zero gradient
    same = linear_divergence(th.clone().requires_grad_(), tw, tb, th, tw, tb, kind, temperature)
    assert abs(float(same.detach())) < 1e-4


def test_js_and_soft_capped_heads_keep_the_plain_path():
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    assert fused_divergence_supported(student, teacher, "forward_kl")
    assert not fused_divergence_supported(student, teacher, "js")
    capped = tiny_model("gemma", seed=2, final_logit_softcapping=30.0)
    assert not fused_divergence_supported(student, capped, "forward_kl")
    with pytest.raises(ValueError, match="forward_kl or reverse_kl"):
        linear_divergence(torch.zeros(1, 2), torch.zeros(3, 2), None, torch.zeros(1, 2), torch.zeros(3, 2), None, "js")


@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
def test_objective_fused_equals_plain_and_never_forms_vocabulary_logits(kd_ratio):
    teacher = tiny_model(seed=1, vocab_size=300)
    student = tiny_model(seed=0, vocab_size=300)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 300, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt: not trained on
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    cfg = {"divergence": "forward_kl", "temperature": 2.0, "kd_ratio": kd_ratio}
    objective = DistillObjective(DistillLoss(cfg), teacher=teacher)
    widths = []
    hook = student.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[-1]))
    loss, n = objective(student, batch)
    hook.remove()
    assert widths == [64], "the fused path must not run the student's head over the whole batch"
    loss.backward()
    fused_grads = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()
    # the plain path: full logits of both models through DistillLoss
    out = student(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False)
    expected_n = int((labels[:, 1:] != -100).sum())
    expected = DistillLoss(cfg)({"logits": out.logits}, {"logits": t_out.logits}, batch) * expected_n
    expected.backward()
    assert n == expected_n
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for k, p in student.named_parameters():
        torch.testing.assert_close(fused_grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
    assert objective.loss.last["kd"] > 0 and ("ce" in objective.loss.last) == (kd_ratio < 1)


def test_held_out_kl_fused_equals_the_full_logits_formula():
    teacher = tiny_model(seed=1)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(20.0)
    g = torch.Generator().manual_seed(4)
    rows = [Example(ids, list(ids)) for ids in (torch.randint(5, 272, (n,), generator=g).tolist() for n in (9, 14, 6))]
    got = held_out_kl(student, teacher, rows, pad_id=0, batch_size=2)
    total, count = 0.0, 0
    for r in rows:
        ids = torch.tensor([r.input_ids])
        s = student(input_ids=ids).logits[0, :-1]
        t = teacher(input_ids=ids).logits[0, :-1]
        total += float(divergence(s, t, "forward_kl").sum())
        count += s.shape[0]
    assert got == pytest.approx(total / count, rel=1e-3)
    assert got > 1e-3
    assert held_out_kl(teacher, teacher, rows, pad_id=0) == pytest.approx(0.0, abs=1e-6)
