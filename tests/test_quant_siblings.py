"""Fused sibling int4 matmuls (q/k/v, gate/up) of a packed model: fewer kernel calls per layer,
the same logits and tokens as each linear on its own, and never a stale or borrowed result."""
from __future__ import annotations

import pytest
import torch

from qingzhou.compress.quantize import quantize
from qingzhou.finetune.testing import tiny_model
from qingzhou.llm.quantized import int4_kernel
from qingzhou.llm.quantized.qlinear import QuantLinear
from qingzhou.llm.quantized.runtime import use_exact_runtime
from qingzhou.llm.quantized.siblings import fuse_siblings, unfuse_siblings

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def _packed(arch: str = "llama", act_order: bool = False):
    """A tiny 4-bit packed model (RTN g32; GPTQ with act-order where asked); `quantize` installs the
    default runtime, fused siblings included."""
    model = tiny_model(arch, **SHAPE)
    if act_order:
        calib = [torch.randint(5, 272, (64,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
        quantize(model, {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "clip_search": False}, calib)
    else:
        quantize(model, {"method": "rtn", "bits": 4, "group_size": 32, "sym": False, "clip_search": False})
    return model


def _count_kernel_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = int4_kernel.Int4Pack.__call__

    def counted(self, x):
        calls[0] += 1
        return real(self, x)

    monkeypatch.setattr(int4_kernel.Int4Pack, "__call__", counted)
    return calls


@pytest.mark.parametrize("arch,act_order", [("llama", False), ("qwen2", False), ("llama", True)])
def test_fused_siblings_give_the_unfused_logits_with_fewer_kernel_calls(monkeypatch, arch, act_order):
    model = _packed(arch, act_order)
    layers = model.config.num_hidden_layers
    assert fuse_siblings(model) == 2 * layers  # q/k/v and gate/up in every layer (idempotent)
    ids = torch.randint(5, 272, (2, 9), generator=torch.Generator().manual_seed(1))
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        model(ids)  # builds the packs (each build checks itself with one call)
        calls[0] = 0
        fused = model(ids).logits
        fused_calls = calls[0]
        unfuse_siblings(model)
        model(ids)
        calls[0] = 0
        alone = model(ids).logits
    assert fused_calls == 4 * layers and calls[0] == 7 * layers  # qkv, o, gate_up, down against 7 linears
    # each output column is the same dot product: equal up to the kernel's own blocking of columns
    assert (fused - alone).abs().max().item() <= 1e-5 * alone.abs().max().item()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_greedy_tokens_are_the_unfused_ones(mode):
    model = _packed()
    ids = torch.randint(5, 272, (1, 6), generator=torch.Generator().manual_seed(2))
    with mode():
        fused = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        unfuse_siblings(model)
        alone = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(fused, alone)


def test_a_sibling_never_returns_columns_of_another_or_a_modified_input():
    model = _packed()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 128)
    with torch.no_grad():
        q1 = attn.q_proj(x)
        x.mul_(2)  # modified in place after q: k and v must see the new values
        k = attn.k_proj(x)
        v_other = attn.v_proj(x.clone())  # another tensor with the same values: computed for it
        q_again = attn.q_proj(x)  # the set was not consumed in order: a fresh result, not q1's
        unfuse_siblings(model)
        assert torch.allclose(k, attn.k_proj(x), atol=1e-6)
        assert torch.allclose(v_other, attn.v_proj(x), atol=1e-6)
        assert torch.allclose(q_again, attn.q_proj(x), atol=1e-6)
        assert not torch.allclose(q1, q_again)


def test_exact_runtime_and_training_do_not_use_the_fused_matmul(monkeypatch):
    model = _packed()
    use_exact_runtime(model)
    assert all(m.siblings is None for m in model.modules() if isinstance(m, QuantLinear))
    model = _packed()
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(1, 4, 128, requires_grad=True)
    mlp = model.model.layers[0].mlp
    mlp(x).sum().backward()  # autograd: the dequantising path, no kernel, gradients reach the input
    assert calls[0] == 0 and x.grad is not None and x.grad.abs().sum() > 0


def test_new_buffers_drop_the_fused_pack():
    model = _packed()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 2, 128)
    with torch.no_grad():
        before = attn.k_proj(x)
        attn.q_proj(x), attn.v_proj(x)
        state = {k: v.clone() for k, v in attn.k_proj.state_dict().items()}
        state["scales"] = state["scales"] * 2
        attn.k_proj.load_state_dict(state)
        after = attn.k_proj(x)
    assert torch.allclose(after, 2 * before, rtol=2e-2, atol=1e-3)


def test_a_deep_copied_model_keeps_its_own_fused_sets():
    import copy

    model = _packed()
    twin = copy.deepcopy(model)
    ids = torch.randint(5, 272, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(ids).logits, twin(ids).logits
    assert torch.equal(a, b)
    group = twin.model.layers[0].self_attn.q_proj.siblings
    assert group is not model.model.layers[0].self_attn.q_proj.siblings
    assert group.members[0] is twin.model.layers[0].self_attn.q_proj
