"""The chunked head + cross-entropy gives the plain loss and gradients, and steps aside where it cannot."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qingzhou.finetune import fused_loss, loop
from qingzhou.finetune.fused_loss import linear_cross_entropy
from qingzhou.llm.head import plain_linear_head
from qingzhou.finetune.loop import token_loss_sum
from qingzhou.finetune.testing import tiny_model


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_plain_in_value_and_gradients(monkeypatch, bias):
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 700)  # 7 rows per chunk of a 100-word vocabulary: 6 chunks
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(100, 16, requires_grad=True)
    b = torch.randn(100, requires_grad=True) if bias else None
    y = torch.randint(0, 100, (37,))
    y[::5] = -100
    params = [t for t in (h, w, b) if t is not None]
    (0.5 * linear_cross_entropy(h, w, b, y)).backward()
    fused = [t.grad.clone() for t in params]
    loss = linear_cross_entropy(h, w, b, y).detach()
    for t in params:
        t.grad = None
    plain = F.cross_entropy(F.linear(h, w, b), y, ignore_index=-100, reduction="sum")
    (0.5 * plain).backward()
    assert torch.allclose(loss, plain.detach(), rtol=1e-6)
    for got, t in zip(fused, params):
        assert torch.allclose(got, t.grad, atol=1e-5), (got - t.grad).abs().max()


def _batch(vocab: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt that is not learned
    labels[2, 20:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("tied", [False, True])
def test_token_loss_sum_fused_equals_plain_for_full_finetuning(monkeypatch, tied):
    model = tiny_model("llama", tie_word_embeddings=tied).train()
    assert plain_linear_head(model)
    batch = _batch(model.config.vocab_size)

    def run() -> tuple[float, int, dict]:
        model.zero_grad()
        loss, n = token_loss_sum(model, batch)
        loss.backward()
        return float(loss.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters()}

    fused = run()
    monkeypatch.setattr(loop, "plain_linear_head", lambda m: False)
    plain = run()
    assert fused[1] == plain[1] == int((batch["labels"][:, 1:] != -100).sum())
    assert fused[0] == pytest.approx(plain[0], rel=1e-5)
    for name, grad in plain[2].items():
        assert torch.allclose(fused[2][name], grad, atol=1e-5, rtol=1e-4), name
    # the head is restored: a normal forward gives vocabulary-sized logits again
    assert model(input_ids=batch["input_ids"]).logits.shape[-1] == model.config.vocab_size


def test_token_loss_sum_fused_under_bf16_autocast_is_close_to_plain(monkeypatch):
    model = tiny_model("llama").train()
    batch = _batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = token_loss_sum(model, batch)
        monkeypatch.setattr(loop, "plain_linear_head", lambda m: False)
        plain, _ = token_loss_sum(model, batch)
    assert float(fused) == pytest.approx(float(plain), rel=2e-2)


def test_fused_loss_steps_aside_for_logit_postprocessing_and_wrapped_heads():
    import peft

    softcapped = tiny_model("llama")
    softcapped.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits change after the head
    assert not plain_linear_head(softcapped)
    lora_head = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    assert not plain_linear_head(lora_head)
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert plain_linear_head(lora)



@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_swiglu_and_rmsnorm_match_the_stock_modules(arch):
    from qingzhou.finetune.fused_ops import fused_training_ops, patchable

    model = tiny_model(arch).train()
    kinds = {type(m).__name__ for m, _ in patchable(model)}
    assert any(k.endswith("MLP") for k in kinds) and any(k.endswith("RMSNorm") for k in kinds)
    batch = _batch(model.config.vocab_size)

    def run() -> tuple[torch.Tensor, dict]:
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"]).logits
        (logits.float().square().mean() + logits[..., 7].sum()).backward()
        return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    stock = run()
    with fused_training_ops(model) as n:
        assert n == len(patchable(model)) > 0
        fused = run()
    assert all("forward" not in m.__dict__ for m, _ in patchable(model))  # restored
    assert torch.allclose(fused[0], stock[0], atol=1e-5)
    for name, grad in stock[1].items():
        assert torch.allclose(fused[1][name], grad, atol=1e-5, rtol=1e-4), name


def test_fused_ops_keep_fewer_saved_activations():
    from qingzhou.finetune.fused_ops import fused_training_ops

    model = tiny_model("llama").train()
    ids = _batch(model.config.vocab_size)["input_ids"]

    def saved_bytes() -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids).logits.sum()
        return sum(seen.values())

    stock = saved_bytes()
    with fused_training_ops(model):
        fused = saved_bytes()
    # per token and layer: one intermediate-size (128) and two hidden-size (64) tensors fewer
    tokens, layers = ids.numel(), model.config.num_hidden_layers
    assert stock - fused >= tokens * layers * (128 + 64) * 4


def test_finetune_with_fused_ops_follows_the_same_trajectory(tmp_path):
    """`fused_ops: true` changes what is kept for backward, not the optimisation: same losses."""
    from qingzhou.finetune import finetune
    from qingzhou.finetune.testing import byte_tokenizer, memorise_data

    tok = byte_tokenizer()
    rows = [{"instruction": f"Name {i}", "output": f"Item number {i} is fine."} for i in range(8)]
    losses = []
    for fused in (False, True):
        model = tiny_model("llama")
        res = finetune(model, tok, memorise_data(tok, rows),
                       {"method": "full", "max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "fused_ops": fused,
                        "progress": False}, output_dir=tmp_path / str(fused))
        losses.append([loss for _, loss in res.train_loss])
        assert all("forward" not in m.__dict__ for m in model.modules())  # patches removed
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert losses[1][-1] < losses[1][0]
