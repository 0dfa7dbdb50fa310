"""`quant_scales`: distillation that trains only a quantized model's per-group scales (issue 21's
repair after `fit`). The student's KL to its dense teacher goes down, its codes, zeros and file size
do not change, the saved GPTQ folder reloads to the trained model, and a resumed run equals an
uninterrupted one."""
from __future__ import annotations

import copy

import pytest
import torch

from qingzhou.compress.quantize import quantize
from qingzhou.errors import RecipeError
from qingzhou.finetune.distill import distill
from qingzhou.finetune.quant_scales import fold_scales, make_scales_trainable, quant_layers
from qingzhou.finetune.testing import tiny_model


def _pair():
    """A dense teacher (made confident like a trained LM) and its 3-bit RTN copy as the student."""
    teacher = tiny_model("llama", seed=0, num_hidden_layers=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(3)
    quantize(student, {"method": "rtn", "bits": 3, "group_size": 32},
             [torch.randint(0, 272, (48,), generator=g) for _ in range(4)])
    return teacher, student


def _cfg(tmp_path, **over):
    return {"divergence": "forward_kl", "temperature": 1.0, "kd_ratio": 1.0, "top_k": None,
            "method": "quant_scales", "learning_rate": 1e-2, "max_steps": 24, "batch_size": 4,
            "warmup_ratio": 0.0, "progress": False, "seed": 0, **over}


def _buffers(model, name):
    return {n: getattr(m, name).detach().clone() for n, m in quant_layers(model).items()}


def test_training_the_scales_lowers_kl_and_keeps_codes_zeros_and_bytes(tmp_path, distill_data):
    from qingzhou.llm import load_model

    tok, data = distill_data
    teacher, student = _pair()
    codes = {n: m.codes() for n, m in quant_layers(student).items()}
    zeros, scales = _buffers(student, "qzeros"), _buffers(student, "scales")
    dense = {n: p.detach().clone() for n, p in student.named_parameters()}  # (quantize rounded them to fp16)
    rep = distill(student, teacher, tok, _cfg(tmp_path), data, output_dir=tmp_path / "run")
    assert rep.kl_after < 0.9 * rep.kl_before, (rep.kl_before, rep.kl_after)
    model = rep.model
    layers = quant_layers(model)
    assert layers and all(m.scale_factor is None for m in layers.values())  # folded
    for n, m in layers.items():
        assert torch.equal(m.codes(), codes[n]) and torch.equal(m.qzeros, zeros[n])
        assert m.scales.dtype == scales[n].dtype == torch.float16
    assert any(not torch.equal(m.scales, scales[n]) for n, m in layers.items())
    # nothing else moved: the embeddings, norms and head are as they were
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, dense[n])]
    assert not moved, moved
    # the artifact is a GPTQ folder of the same size that reloads to the trained model
    folder = tmp_path / "run" / "model"
    assert rep.finetune.artifact == "model" and (folder / "config.json").is_file()
    reloaded, _ = load_model(str(folder), device="cpu")
    ids = torch.tensor([[5, 40, 41, 99, 120, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    reference = tmp_path / "untrained"
    from qingzhou.llm.quantized.gptq_layout import save_quantized
    _, again = _pair()
    save_quantized(again, tok, reference)
    assert (folder / "model.safetensors").stat().st_size == (reference / "model.safetensors").stat().st_size


def test_train_norms_moves_only_the_norms_and_the_folder_keeps_them(tmp_path, distill_data):
    """`train_norms`: the RMSNorm weights train beside the scales (the bench's repair arm uses it);
    embeddings and head stay, and the saved folder holds the trained norms."""
    from qingzhou.llm import load_model

    tok, data = distill_data
    teacher, student = _pair()
    dense = {n: p.detach().clone() for n, p in student.named_parameters()}
    rep = distill(student, teacher, tok, _cfg(tmp_path, train_norms=True, max_steps=12), data,
                  output_dir=tmp_path / "run")
    assert rep.kl_after < rep.kl_before
    moved = {n for n, p in rep.model.named_parameters() if not torch.equal(p, dense[n])}
    norms = {n for n in dense if "norm" in n}
    assert moved and moved <= norms, moved - norms
    reloaded, _ = load_model(str(tmp_path / "run" / "model"), device="cpu")
    params = dict(reloaded.named_parameters())
    for n in moved:  # stored in fp16, as every dense tensor of the folder
        trained = rep.model.get_parameter(n).detach()
        assert torch.equal(params[n], trained.half().to(params[n].dtype))
        assert not torch.equal(params[n], dense[n].half().to(params[n].dtype))


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, distill_data):
    tok, data = distill_data
    cfg = _cfg(tmp_path, max_steps=8, save_every=3)
    teacher, student = _pair()
    straight = distill(student, teacher, tok, cfg, data, output_dir=tmp_path / "straight")

    class Crash(Exception):
        pass

    def crash(step, metrics):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        distill(_pair()[1], teacher, tok, cfg, data, output_dir=tmp_path / "crashed", callbacks=[crash])
    resumed = distill(_pair()[1], teacher, tok, cfg, data, output_dir=tmp_path / "crashed")
    assert resumed.finetune.resumed_from == 3
    for (_, a), (_, b) in zip(straight.finetune.train_loss, resumed.finetune.train_loss):
        assert abs(a - b) < 1e-5, (a, b)
    a, b = _buffers(straight.model, "scales"), _buffers(resumed.model, "scales")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_scales_are_the_only_trainable_tensors_and_fold_back(tmp_path):
    _, student = _pair()
    x = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        before = student(x).logits
    make_scales_trainable(student)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scale_factor") for n in trainable)
    assert len(trainable) == len(quant_layers(student))
    loss = student(x).logits.float().pow(2).mean()
    loss.backward()  # gradients reach every layer's scales through the dequantising path
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, before, rtol=1e-3, atol=1e-3)
    fold_scales(student)
    assert not any(n.endswith("scale_factor") for n, _ in student.named_parameters())
    assert not any(k.endswith("scale_factor") for k in student.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, before, rtol=0, atol=0)  # fp16 -> fp32 -> fp16: exact
    with pytest.raises(RecipeError, match="no quantized"):
        make_scales_trainable(tiny_model("llama"))


def test_recipe_fit_then_scale_repair_keeps_the_plan(tmp_path, tiny_llama_dir):
    """`fit` then `distill` with `method: quant_scales` (teacher: the loaded model): the repaired
    model is the fitted plan with other scales - same per-linear bits and codes, same file size."""
    import json

    import yaml
    from safetensors.torch import load_file

    from qingzhou.recipes.runner import run_recipe

    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"Line {i}: the grid operator balances supply and demand." for i in range(40)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "stages": [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"},
        {"kind": "fit", "method": "rtn", "avg_bits": 3.5, "neighbours": []},
        {"kind": "distill", "teacher": "base", "method": "quant_scales", "max_steps": 4, "batch_size": 2,
         "top_k": None, "data": {"source": str(text), "format": "text", "max_length": 48}},
    ]}, sort_keys=False))
    run_recipe(str(recipe), tmp_path / "run", progress=False)
    fitted, repaired = tmp_path / "run" / "02-fit" / "model", tmp_path / "run" / "03-distill" / "model"
    a, b = load_file(str(fitted / "model.safetensors")), load_file(str(repaired / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        if k.endswith("scales"):
            assert a[k].dtype == b[k].dtype == torch.float16 and a[k].shape == b[k].shape
        elif k.endswith(("qweight", "qzeros", "g_idx")):
            assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("scales"))
    assert (fitted / "model.safetensors").stat().st_size == (repaired / "model.safetensors").stat().st_size
    qa = json.loads((fitted / "config.json").read_text())["quantization_config"]
    qb = json.loads((repaired / "config.json").read_text())["quantization_config"]
    assert qa.get("dynamic") == qb.get("dynamic") and qa["bits"] == qb["bits"]
