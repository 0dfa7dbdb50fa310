"""`distill()` on tiny random models: the student's KL to the teacher goes down through the one
fine-tuning loop, the teacher's top-k cache is built once and replayed, pruned / structurally
pruned / quantized (LoRA) students distil, and an interrupted run resumes exactly."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from qingzhou.finetune.distill import distill, parse_distill_config
from qingzhou.errors import RecipeError
from qingzhou.finetune.testing import tiny_model

@pytest.fixture(scope="module")
def tok(distill_data):
    return distill_data[0]


@pytest.fixture(scope="module")
def data(distill_data):
    return distill_data[1]


def _teacher(seed=0):
    """A random teacher made confident like a trained LM (entropy ~2.4 nats, top-64 holds ~98% of
    the mass); a fresh random model's near-uniform outputs would make top-k targets meaningless."""
    model = tiny_model("llama", seed=seed, num_hidden_layers=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def _cfg(tmp_path, **over):
    return {"divergence": "forward_kl", "temperature": 1.0, "kd_ratio": 1.0, "top_k": 64,
            "cache_dir": str(tmp_path / "teacher-cache"), "method": "full", "learning_rate": 3e-3,
            "max_steps": 30, "batch_size": 4, "warmup_ratio": 0.0, "progress": False, **over}


def _count_forwards(model):
    calls = []
    return calls, model.register_forward_hook(lambda *_: calls.append(1))


def test_kl_goes_down_and_the_teacher_cache_is_built_once(tmp_path, tok, data):
    teacher = _teacher()
    calls, hook = _count_forwards(teacher)
    student = tiny_model("llama", seed=1, num_hidden_layers=1)
    rep = distill(student, teacher, tok, _cfg(tmp_path), data, output_dir=tmp_path / "run1")
    n_train = len(data.train)
    assert 30 * 4 > 2 * n_train  # several epochs over the rows ...
    builds = math.ceil(n_train / 8)
    assert rep.teacher_forwards["cache"] == builds and rep.teacher_forwards["train"] == 0  # ... none reran it
    assert len(calls) == builds + rep.teacher_forwards["eval"]
    assert rep.teacher["mode"] == "cache" and not rep.teacher["hit"] and rep.teacher["rows"] == n_train
    assert rep.kl_after < 0.5 * rep.kl_before, (rep.kl_before, rep.kl_after)
    assert (tmp_path / "run1" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run1" / "distill.json").is_file()

    # a second distillation from the same teacher on the same rows reuses the cache: no teacher forward
    calls.clear()
    shards = sorted((tmp_path / "teacher-cache").glob("*/shard-*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    again = distill(tiny_model("llama", seed=2, num_hidden_layers=1), teacher, tok, _cfg(tmp_path, max_steps=3),
                    data, output_dir=tmp_path / "run2")
    assert again.teacher["hit"] and again.teacher_forwards["cache"] == 0 and again.teacher_forwards["train"] == 0
    assert len(calls) == again.teacher_forwards["eval"]
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    # another teacher (different weights) gets its own cache
    other = distill(tiny_model("llama", seed=2, num_hidden_layers=1), _teacher(seed=5), tok,
                    _cfg(tmp_path, max_steps=1), data, output_dir=tmp_path / "run3")
    assert not other.teacher["hit"] and len(list((tmp_path / "teacher-cache").iterdir())) == 2
    hook.remove()


def test_cached_top_k_equals_the_live_teacher_when_k_is_the_vocabulary(tmp_path, tok, data):
    """Same training trajectory from the cache (k = vocabulary, fp32 values) as from a live teacher."""
    teacher = _teacher()
    runs = {}
    for name, over in {"cache": {"top_k": 272}, "live": {"top_k": None}}.items():
        cfg = parse_distill_config(_cfg(tmp_path, max_steps=4, **over))
        rep = distill(tiny_model("llama", seed=1, num_hidden_layers=1), teacher, tok, cfg, data,
                      output_dir=tmp_path / name)
        runs[name] = rep
    assert runs["live"].teacher_forwards["train"] == 4 and runs["cache"].teacher_forwards["train"] == 0
    for (_, a), (_, b) in zip(runs["cache"].finetune.train_loss, runs["live"].finetune.train_loss):
        assert abs(a - b) < 2e-3 * max(1.0, abs(b)), (a, b)  # fp16 cached values


def test_a_pruned_student_stays_pruned(tmp_path, tok, data):
    from qingzhou.compress.prune import prune

    teacher = _teacher()
    student = copy.deepcopy(teacher)
    prune(student, {"method": "magnitude", "sparsity": 0.5})
    zeros_before = {n: (p == 0) for n, p in student.named_parameters() if p.ndim == 2 and (p == 0).float().mean() > 0.4}
    assert zeros_before
    rep = distill(student, teacher, tok, _cfg(tmp_path, max_steps=20, learning_rate=5e-4), data,
                  output_dir=tmp_path / "run")
    assert rep.kl_after < 0.7 * rep.kl_before, (rep.kl_before, rep.kl_after)
    params = dict(rep.model.named_parameters())
    for n, z in zeros_before.items():
        assert bool((params[n][z] == 0).all()), n  # every pruned weight is still exactly zero
        assert not torch.equal(params[n] == 0, torch.ones_like(z)), n
    assert rep.sparsity["kept_pruned"] == rep.sparsity["pruned_matrices"] == len(zeros_before)


def test_structurally_pruned_student_distils_with_hidden_state_matching(tmp_path, tok, data):
    from qingzhou.compress.prune.structured import structured_prune

    teacher = _teacher()
    student = copy.deepcopy(teacher)
    calib = [torch.tensor(ex.input_ids) for ex in data.train[:8]]
    structured_prune(student, {"method": "structured", "heads": 0.5, "mlp": 0.5, "layers": 1}, calib)
    assert student.config.num_hidden_layers == 2 and student.config.num_key_value_heads == 1
    cfg = _cfg(tmp_path, max_steps=20, hidden={"weight": 1.0}, kd_ratio=0.8)
    rep = distill(student, teacher, tok, cfg, data, output_dir=tmp_path / "run")
    assert rep.teacher["mode"] == "live" and rep.teacher_forwards["train"] == 20  # hidden states: live teacher
    assert rep.kl_after < 0.7 * rep.kl_before, (rep.kl_before, rep.kl_after)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert reloaded.config.num_hidden_layers == 2
    ids = torch.tensor([data.eval[0].input_ids])
    torch.testing.assert_close(reloaded(ids).logits, rep.model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def _nf4(model):
    """Swap the decoder linears for bitsandbytes NF4 layers on CPU (a frozen quantized base)."""
    bnb = pytest.importorskip("bitsandbytes")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                          quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
                    setattr(parent, name, q.to("cpu"))
    return model


def test_lora_on_a_frozen_4bit_base(tmp_path, tok, data):
    teacher = _teacher()
    student = _nf4(copy.deepcopy(teacher))
    weight = student.model.layers[0].mlp.up_proj.weight  # packed NF4 codes
    codes = weight.clone()
    cfg = _cfg(tmp_path, method="lora", r=8, alpha=16, dropout=0.0, learning_rate=1e-3, max_steps=25)
    rep = distill(student, teacher, tok, cfg, data, output_dir=tmp_path / "run")
    assert rep.finetune.artifact == "adapter" and rep.finetune.trainable_params < rep.finetune.total_params / 4
    assert rep.kl_after < 0.5 * rep.kl_before, (rep.kl_before, rep.kl_after)  # measured 0.058 -> 0.007
    assert torch.equal(weight, codes) and not weight.requires_grad  # the 4-bit base did not move
    assert any("lora_A" in n for n, p in rep.model.named_parameters() if p.requires_grad)


class Crash(Exception):
    pass


def test_resume_continues_exactly_including_the_hidden_projections(tmp_path, tok, data):
    teacher = _teacher()
    cfg = _cfg(tmp_path, max_steps=8, save_every=3, hidden={"weight": 1.0}, kd_ratio=0.5)
    straight = distill(tiny_model("llama", seed=1, num_hidden_layers=1), teacher, tok, cfg, data,
                       output_dir=tmp_path / "straight")

    def crash(step, metrics):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        distill(tiny_model("llama", seed=1, num_hidden_layers=1), teacher, tok, cfg, data,
                output_dir=tmp_path / "crashed", callbacks=[crash])
    resumed = distill(tiny_model("llama", seed=7, num_hidden_layers=1), teacher, tok, cfg, data,
                      output_dir=tmp_path / "crashed")
    assert resumed.finetune.resumed_from == 3
    for (_, a), (_, b) in zip(straight.finetune.train_loss, resumed.finetune.train_loss):
        assert abs(a - b) < 1e-5, (a, b)
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6)


def test_config_flat_or_nested_and_user_errors(tmp_path, tok, data):
    flat = parse_distill_config({"temperature": 3, "method": "lora", "r": 4, "max_steps": 7})
    nested = parse_distill_config({"temperature": 3, "train": {"method": "lora", "r": 4, "max_steps": 7}})
    assert flat == nested and flat.train.r == 4 and flat.train.method == "lora"
    with pytest.raises(ValueError, match="train.rr"):
        parse_distill_config({"method": "lora", "rr": 4})
    with pytest.raises(RecipeError, match="vocabulary"):
        distill(tiny_model("llama", vocab_size=300), _teacher(), tok, _cfg(tmp_path), data, output_dir=tmp_path / "x")
    teacher = _teacher()
    with pytest.raises(RecipeError, match="teacher is the student"):
        distill(teacher, teacher, tok, _cfg(tmp_path), data, output_dir=tmp_path / "y")
