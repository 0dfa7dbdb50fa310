"""Distillation losses: divergences against hand formulas, temperature scaling, masking, top-k
teachers, and a tiny student whose KL to a tiny teacher goes down when trained on the loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qingzhou.finetune.distill import DistillLoss, divergence, topk_divergence
from qingzhou.finetune.testing import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def test_divergences_match_hand_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 2
    ps, pt = s.softmax(-1), t.softmax(-1)
    fkl = (pt * (pt.log() - ps.log())).sum(-1)
    rkl = (ps * (ps.log() - pt.log())).sum(-1)
    m = (ps + pt) / 2
    js = 0.5 * (pt * (pt.log() - m.log())).sum(-1) + 0.5 * (ps * (ps.log() - m.log())).sum(-1)
    torch.testing.assert_close(divergence(s, t, "forward_kl"), fkl)
    torch.testing.assert_close(divergence(s, t, "reverse_kl"), rkl)
    torch.testing.assert_close(divergence(s, t, "js"), js)
    torch.testing.assert_close(divergence(s, t, "js"), divergence(t, s, "js"))  # symmetric
    assert (divergence(s, t * 100, "js") <= math.log(2) + 1e-6).all()  # bounded by ln 2
    torch.testing.assert_close(fkl, F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1))
    # temperature: T^2 x the divergence of the softened distributions
    torch.testing.assert_close(divergence(s, t, "forward_kl", 3.0), 9 * divergence(s / 3, t / 3, "forward_kl"))
    assert float(divergence(t, t, "reverse_kl").abs().max()) < 1e-6


def test_topk_teacher_equals_full_teacher_when_k_is_the_vocabulary():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    vals, idx = torch.topk(t, 10, dim=-1)
    for kind in ("forward_kl", "reverse_kl", "js"):
        torch.testing.assert_close(topk_divergence(s, vals, idx, kind, 2.0), divergence(s, t, kind, 2.0))
    vals3, idx3 = torch.topk(t, 3, dim=-1)
    assert (topk_divergence(s, vals3, idx3, "forward_kl") >= 0).all()


def test_loss_only_counts_label_positions_and_mixes_cross_entropy():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :4] = -100  # prompt tokens: not trained on
    batch = {"labels": labels}
    loss_fn = DistillLoss({"divergence": "forward_kl", "temperature": 1.0, "kd_ratio": 1.0})
    got = loss_fn({"logits": s}, {"logits": t}, batch)
    mask = labels[:, 1:] != -100
    expected = divergence(s[:, :-1][mask], t[:, :-1][mask], "forward_kl").mean()
    torch.testing.assert_close(got, expected)
    mixed = DistillLoss({"kd_ratio": 0.25, "temperature": 1.0})({"logits": s}, {"logits": t}, batch)
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(mixed, 0.25 * expected + 0.75 * ce)


def _held_out_kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(divergence(student(ids).logits, teacher(ids).logits, "forward_kl").mean())


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "js"])
def test_student_kl_to_teacher_goes_down(kind):
    torch.manual_seed(0)
    teacher = tiny_model("llama", seed=0)
    student = tiny_model("qwen2", seed=1, num_hidden_layers=1)  # another architecture, half the depth
    g = torch.Generator().manual_seed(3)
    held_out = torch.randint(5, 272, (4, 32), generator=g)
    before = _held_out_kl(student, teacher, held_out)
    loss_fn = DistillLoss({"divergence": kind, "temperature": 2.0, "kd_ratio": 1.0})
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    student.train()
    for _ in range(40):
        ids = torch.randint(5, 272, (8, 32), generator=g)
        with torch.no_grad():
            t_out = teacher(ids)
        loss = loss_fn(student(ids), t_out, {"labels": ids})
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    after = _held_out_kl(student, teacher, held_out)
    assert after < 0.5 * before, (before, after)


def test_hidden_state_matching_with_a_learned_projection():
    teacher = tiny_model("llama", seed=0, num_hidden_layers=4)
    student = tiny_model("llama", seed=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, num_hidden_layers=2)
    loss_fn = DistillLoss.for_models(student, teacher, {"kd_ratio": 1.0, "hidden": {"weight": 1.0}})
    assert loss_fn.layer_map == {1: 2, 2: 4}
    assert loss_fn.projections["1"].weight.shape == (64, 32)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, 272, (4, 24), generator=g)
    opt = torch.optim.AdamW(list(student.parameters()) + list(loss_fn.parameters()), lr=3e-3)
    history = []
    for _ in range(30):
        with torch.no_grad():
            t_out = teacher(ids, output_hidden_states=True)
        loss = loss_fn(student(ids, output_hidden_states=True), t_out, {"input_ids": ids})
        opt.zero_grad()
        loss.backward()
        assert loss_fn.projections["2"].weight.grad is not None
        opt.step()
        history.append(loss_fn.last["hidden"])
    assert history[-1] < 0.5 * history[0], history


def test_teacher_topk_cache_replays_rows_in_any_batching(tmp_path):
    from qingzhou.finetune.distill import TeacherCache, build_teacher_cache
    from qingzhou.data.packing import collate
    from qingzhou.errors import DataError

    teacher = tiny_model("llama", seed=0)
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(5, 272, (int(n),), generator=g).tolist() for n in (16, 9, 12, 16, 5)]
    calls = []
    h = teacher.register_forward_hook(lambda *a: calls.append(1))
    info = build_teacher_cache(teacher, rows, tmp_path / "cache", k=272, batch_size=2, values_dtype=torch.float32)
    h.remove()
    assert len(calls) == 3 and info.tokens == 58 and info.rows == 5 and info.forwards == 3
    cache = TeacherCache(tmp_path / "cache")
    student = tiny_model("qwen2", seed=1)
    loss_fn = DistillLoss({"kd_ratio": 1.0, "temperature": 2.0})
    from qingzhou.finetune.distill.teacher_cache import _as_rows

    # rows regrouped and re-padded differently from how the cache was built: same targets
    batch = {k: v for k, v in collate(_as_rows([rows[4], rows[1], rows[0]]), 0, packed=False).items()}
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s_out, t_out = student(**inputs), teacher(**inputs)
    torch.testing.assert_close(loss_fn(s_out, cache.for_batch(batch, pad_id=0), batch),
                               loss_fn(s_out, t_out, batch), rtol=1e-5, atol=1e-5)
    small = build_teacher_cache(teacher, rows, tmp_path / "small", k=16)
    assert small.bytes < info.bytes / 10
    foreign = collate(_as_rows([[7, 8, 9, 10]]), 0, packed=False)
    with pytest.raises(DataError, match="not in the teacher cache"):
        cache.for_batch(foreign, pad_id=0)
