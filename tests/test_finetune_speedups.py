"""Exact training speed-ups: per-sample attention over packed rows and the fused peft LoRA linear
give the same values and gradients as the stock paths."""
import pytest

torch = pytest.importorskip("torch")


def _tiny():
    from qingzhou.finetune.testing import tiny_model

    torch.manual_seed(0)
    return tiny_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2)


def _packed_batch(vocab):
    ids = torch.randint(5, vocab, (2, 40))
    pos = torch.stack([torch.cat([torch.arange(15), torch.arange(20), torch.arange(5)]),
                       torch.cat([torch.arange(30), torch.arange(10)])])
    return ids, pos


def test_packed_attention_matches_masked_sdpa_and_separate_samples():
    from qingzhou.finetune.packed_attention import packed_attention

    model = _tiny()
    ids, pos = _packed_batch(model.config.vocab_size)
    masked = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    with packed_attention(model) as n:
        assert n == 1 and model.config._attn_implementation == "qz_packed"
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        pad = torch.ones(2, 40, dtype=torch.long)
        pad[1, 30:] = 0  # a real padding mask goes to transformers' own SDPA path
        padded_inside = model(input_ids=ids, attention_mask=pad, use_cache=False).logits
    assert model.config._attn_implementation == "sdpa"
    assert (packed - masked).abs().max() < 1e-5
    alone = model(input_ids=ids[:1, 15:35], use_cache=False).logits  # the second sample of row 0 on its own
    assert (packed[0, 15:35] - alone[0]).abs().max() < 1e-5
    padded = model(input_ids=ids, attention_mask=pad, use_cache=False).logits
    assert (padded_inside - padded).abs().max() < 1e-6


def test_fused_lora_linear_same_values_and_gradients_as_peft():
    import peft

    from qingzhou.finetune.fused_lora import fused_lora_linears

    model = peft.get_peft_model(_tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # B starts at zero in peft: make the adapter matter
    ids, pos = _packed_batch(model.config.vocab_size)

    def grads(fused):
        model.zero_grad(set_to_none=True)
        with fused_lora_linears(model, enabled=fused) as n:
            assert n == (6 if fused else 0)
            out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        (out.square().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_out, ref = grads(False)
    out, got = grads(True)
    assert (out - ref_out).abs().max() < 1e-5
    assert ref.keys() == got.keys() and len(ref) == 12
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-7), name
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored on exit


def test_fused_lora_falls_back_for_dropout():
    import peft

    from qingzhou.finetune.fused_lora import _lora_linears, fused_lora_linears, plain_state

    model = peft.get_peft_model(_tiny(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"]))
    layer = _lora_linears(model)[0]
    with fused_lora_linears(model):
        assert plain_state(layer, torch.zeros(1, 64), (), {}) is None  # dropout: peft's own forward


def _mlp_grads(model, fused, fallbacks=None):
    from qingzhou.finetune.fused_mlp import fused_mlps

    torch.manual_seed(1)
    ids, pos = _packed_batch(model.config.vocab_size)
    model.zero_grad(set_to_none=True)
    with fused_mlps(model, fallbacks, enabled=fused) as n:
        out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    (out.square().mean()).backward()
    return n, out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets", [["gate_proj", "up_proj", "down_proj", "q_proj"], ["down_proj"], None])
def test_fused_mlp_same_values_and_gradients_as_stock(targets):
    """LoRA on all, some or none (full fine-tuning, biased projections) of the MLP's projections."""
    import peft

    model = _tiny()
    if targets is None:
        for mlp in (layer.mlp for layer in model.model.layers):  # plain trainable linears, with a bias
            mlp.up_proj.bias = torch.nn.Parameter(torch.randn(mlp.up_proj.out_features) * 0.1)
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        for k, p in model.named_parameters():
            if "lora_B" in k:
                torch.nn.init.normal_(p, std=0.05)
    _, ref_out, ref = _mlp_grads(model, False)
    n, out, got = _mlp_grads(model, True)
    assert n == 2
    assert (out - ref_out).abs().max() < 1e-5
    assert ref.keys() == got.keys() and len(ref) > 0
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-7), k
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored on exit


def test_fused_mlp_keeps_two_intermediate_tensors_not_four():
    """What backward keeps per MLP: gate and up (intermediate-size), not also silu(gate) and the product."""
    import peft

    model = peft.get_peft_model(_tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    ids, pos = _packed_batch(model.config.vocab_size)

    def saved_intermediate(fused):
        from qingzhou.finetune.fused_lora import fused_lora_linears
        from qingzhou.finetune.fused_mlp import fused_mlps

        storages = set()

        def pack(t):
            if t.shape[-1] == 128 and t.numel() >= 80 * 128:  # (tokens x intermediate) activations
                storages.add(t.untyped_storage().data_ptr())
            return t

        with fused_lora_linears(model), fused_mlps(model, enabled=fused), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, position_ids=pos, use_cache=False)
        return len(storages)

    assert saved_intermediate(False) == 2 * 4  # 2 layers x (gate, silu(gate), up, product)
    assert saved_intermediate(True) == 2 * 2


def test_fused_mlp_falls_back_for_a_projection_it_cannot_take():
    import peft

    model = peft.get_peft_model(_tiny(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["up_proj"]))
    calls = []
    fallbacks = {id(layer.mlp): (lambda x, m=layer.mlp: calls.append(1) or type(m).forward(m, x))
                 for layer in model.base_model.model.model.layers}
    model.eval()  # dropout off, but the dropout module is still there: not the plain state
    _, ref_out, _ = _mlp_grads(model, False)
    _, out, _ = _mlp_grads(model, True, fallbacks)
    assert len(calls) == 2 and torch.equal(out, ref_out)


def test_fused_ops_take_a_bitsandbytes_4bit_base_with_the_same_values_and_gradients():
    """QLoRA: LoRA linears and MLPs over NF4 bases run fused, matching peft + bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    import peft

    from qingzhou.finetune.fused_lora import _lora_linears, fused_lora_linears
    from qingzhou.finetune.fused_mlp import fused_mlps
    from qingzhou.finetune.qlora import quantize_base_4bit

    model = quantize_base_4bit(_tiny(), compute_dtype="float32")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for k, p in model.named_parameters():
        if "lora_B" in k:
            torch.nn.init.normal_(p, std=0.05)
    assert len(_lora_linears(model)) == 14 and type(_lora_linears(model)[0]).__module__.endswith("lora.bnb")
    torch.manual_seed(1)
    ids, pos = _packed_batch(model.config.vocab_size)

    def grads(fused):
        model.zero_grad(set_to_none=True)
        with fused_lora_linears(model, enabled=fused) as n_lin, fused_mlps(model, enabled=fused) as n_mlp:
            out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        (out.square().mean()).backward()
        return (n_lin, n_mlp), out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    _, ref_out, ref = grads(False)
    counts, out, got = grads(True)
    assert counts == (14, 2)
    from qingzhou.finetune.fused_mlp import _parts

    mlp = model.base_model.model.model.layers[0].mlp  # the fused op takes every projection, 4-bit base and all
    assert all(_parts(p, torch.zeros(1, 64))[5] is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert (out - ref_out).abs().max() < 1e-4
    assert ref.keys() == got.keys() and len(ref) == 28
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-3, atol=1e-6), k
