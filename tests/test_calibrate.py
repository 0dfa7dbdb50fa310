"""The layer-by-layer calibration engine: captured inputs, group order, sequential effects, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qingzhou.compress.calibrate import LayerwiseOptions, find_decoder_layers, run_layerwise
from qingzhou.compress.hessian import HessianAccumulator, HessianStore, damped_inverse_cholesky
from qingzhou.errors import ModelLoadError
from qingzhou.finetune.testing import tiny_model


def _samples(n=6, length=24, seed=1, vocab=272):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


class Recorder:
    """Callback that records what the engine hands it and checks inputs against the full model."""

    def __init__(self):
        self.tokens: dict[str, int] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.finished: list[list[str]] = []
        self.layer_inputs: list[torch.Tensor] = []

    def begin_layer(self, index, layer, inputs):
        self.layer_inputs.append(torch.cat([b.hidden for b in inputs]))

    def add_batch(self, name, module, x):
        assert x.dim() == 2 and x.shape[1] == module.in_features
        self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
        self.inputs.setdefault(name, []).append(x.clone())

    def finish_group(self, index, layer, modules):
        self.finished.append(list(modules))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layer_inputs_match_the_full_model_and_groups_are_sequential(arch):
    model = tiny_model(arch)
    samples = _samples()
    rec = Recorder()
    report = run_layerwise(model, samples, rec, LayerwiseOptions(batch_size=4, device="cpu"))
    with torch.no_grad():
        hs = model(torch.stack(samples), output_hidden_states=True).hidden_states
    assert len(rec.layer_inputs) == 2
    for i in range(2):  # layer i's cached input == the model's hidden state before layer i
        torch.testing.assert_close(rec.layer_inputs[i], hs[i], rtol=1e-4, atol=1e-5)
    p = "model.layers.0."
    assert report.groups == [[p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                             [p + "self_attn.o_proj"], [p + "mlp.gate_proj", p + "mlp.up_proj"],
                             [p + "mlp.down_proj"]]
    assert len(rec.finished) == 8
    assert all(n == 6 * 24 for n in rec.tokens.values()) and len(rec.tokens) == 14
    assert report.tokens == 6 * 24 and report.unfed == []


def test_later_groups_see_the_rewritten_weights():
    """True-sequential: after q/k/v are finished, o_proj's inputs come from the *new* v_proj."""

    class ZeroV(Recorder):
        def finish_group(self, index, layer, names):
            super().finish_group(index, layer, names)
            if any(n.endswith("v_proj") for n in names):
                layer.self_attn.v_proj.weight.zero_()

    model = tiny_model("llama")
    rec = ZeroV()
    run_layerwise(model, _samples(), rec, LayerwiseOptions(device="cpu"))
    o_in = torch.cat(rec.inputs["model.layers.0.self_attn.o_proj"])
    assert o_in.abs().max() == 0  # attention output is zero once v_proj is zero
    # without true-sequential all linears are collected in one pass from the original weights
    model = tiny_model("llama")
    rec = ZeroV()
    run_layerwise(model, _samples(), rec, LayerwiseOptions(device="cpu", true_sequential=False))
    assert torch.cat(rec.inputs["model.layers.0.self_attn.o_proj"]).abs().max() > 0
    assert len(rec.finished) == 2


def test_refine_layer_rewrites_any_linear_and_the_next_layer_sees_it():
    """`refine_layer` runs after the last group and before the outputs: a rewrite there (here of
    the finished attention's o_proj, whose output the engine had recorded for replay) reaches the
    next layer's inputs, which equal the final model's own hidden states."""

    class Refine(Recorder):
        def __init__(self):
            super().__init__()
            self.calls: list[int] = []

        def refine_layer(self, index, layer, inputs):
            self.calls.append(index)
            layer.self_attn.o_proj.weight.mul_(3.0)
            return True

    model = tiny_model("llama")
    samples = _samples()
    rec = Refine()
    run_layerwise(model, samples, rec, LayerwiseOptions(batch_size=4, device="cpu"))
    assert rec.calls == [0, 1]
    with torch.no_grad():
        hs = model(torch.stack(samples), output_hidden_states=True).hidden_states
    torch.testing.assert_close(rec.layer_inputs[1], hs[1], rtol=1e-4, atol=1e-5)


def test_linear_without_activations_is_reported():
    model = tiny_model("llama")
    model.model.layers[1].mlp.unused = nn.Linear(64, 64)  # never called in forward
    rec = Recorder()
    with pytest.warns(UserWarning, match="received no calibration activations"):
        report = run_layerwise(model, _samples(n=2), rec, LayerwiseOptions(device="cpu"))
    assert report.unfed == ["model.layers.1.mlp.unused"]
    assert any("model.layers.1.mlp.unused" in g for g in rec.finished)


def test_targets_filter_and_unsupported_architecture():
    model = tiny_model("llama")
    rec = Recorder()
    run_layerwise(model, _samples(n=2), rec, LayerwiseOptions(device="cpu", targets=lambda n: n.endswith("down_proj")))
    assert sorted(rec.tokens) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]

    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(ModelLoadError, match="Supported:.*model.layers"):
        find_decoder_layers(NoLayers())


def test_hessian_accumulator_is_the_token_average():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)]
    acc = HessianAccumulator(8, "cpu")
    for x in xs:
        acc.add(x)
    X = torch.cat(xs)
    torch.testing.assert_close(acc.H, 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
    assert acc.n == 16


def test_singular_hessian_is_retried_with_more_damping():
    x = torch.ones(10, 1) @ torch.randn(1, 16)  # rank 1: not positive definite without damping
    H = 2 * x.T @ x / 10
    with pytest.warns(UserWarning, match="not positive definite"):
        inv = damped_inverse_cholesky(H, damp_percent=0.0, name="probe")
    assert inv.retries >= 1 and inv.damp_percent > 0
    assert torch.isfinite(inv.chol_inv_upper).all()


def test_linears_reading_one_input_share_one_hessian_computation():
    """q/k/v (and gate/up) get the same flattened tensor from the engine: X^T X is computed once, and
    the shared Hessian equals the one computed separately."""
    torch.manual_seed(0)
    store = HessianStore()
    calls = {"n": 0}
    original = HessianAccumulator.add

    def counting_add(self, x):
        calls["n"] += 1
        original(self, x)

    HessianAccumulator.add = counting_add
    try:
        for _ in range(3):
            x = torch.randn(16, 8)
            for name in ("q", "k", "v"):
                store.add(name, x)
            store.add("o", torch.randn(16, 8))
    finally:
        HessianAccumulator.add = original
    assert calls["n"] == 6  # one per batch for q/k/v together, one per batch for o
    assert store["q"] is store["k"] is store["v"] and store["o"] is not store["q"]
    torch.manual_seed(0)
    alone = HessianAccumulator(8, "cpu")
    for _ in range(3):
        alone.add(torch.randn(16, 8))
        torch.randn(16, 8)
    assert torch.allclose(store["v"].H, alone.H)


def test_wide_hessian_triangular_update_equals_the_full_product():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(40, 700, generator=g), torch.randn(25, 700, generator=g)]  # 700: 3 blocks, ragged
    acc = HessianAccumulator(700, "cpu")
    for x in xs:
        acc.add(x)
    X = torch.cat(xs)
    H = acc.H
    torch.testing.assert_close(H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(H, H.T)


def _attention_calls(model):
    """Completed forwards of layer 0's o_proj and q_proj (a replayed block calls neither)."""
    calls = {"o": 0, "q": 0}
    attn = model.model.layers[0].self_attn
    attn.o_proj.register_forward_hook(lambda *a: calls.__setitem__("o", calls["o"] + 1))
    attn.q_proj.register_forward_hook(lambda *a: calls.__setitem__("q", calls["q"] + 1))
    return calls


def test_finished_attention_is_replayed_exactly_and_runs_fewer_times():
    """With q/k/v/o final, later runs of the layer (gate/up, down, outputs) reuse the attention
    block's recorded output instead of recomputing it: identical results, fewer attention calls;
    shared groups stop before their first member computes."""

    class Rewrite(Recorder):  # every group's weights change, as a quantizer's would
        def finish_group(self, index, layer, names):
            super().finish_group(index, layer, names)
            mods = dict(layer.named_modules())
            for n in names:
                w = mods[n.split(f"layers.{index}.", 1)[1]].weight
                w.copy_(torch.round(w * 8) / 8)

    results = {}
    for reuse in (False, True):
        model = tiny_model("llama")
        calls = _attention_calls(model)
        rec = Rewrite()
        run_layerwise(model, _samples(), rec, LayerwiseOptions(batch_size=2, device="cpu", reuse_outputs=reuse))
        results[reuse] = (rec, calls, model)
    (plain, plain_calls, m0), (fast, fast_calls, m1) = results[False], results[True]
    for name in plain.inputs:  # every linear saw bit-identical inputs
        for a, b in zip(plain.inputs[name], fast.inputs[name]):
            assert torch.equal(a, b), name
    for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
        assert torch.equal(p0, p1), n
    b = 3  # batches (6 samples / 2). Runs: probe, q/k/v, o, gate/up, down, outputs
    assert plain_calls["q"] == 1 + 4 * b  # the q/k/v run stops at q's pre-hook, before q computes
    assert plain_calls["o"] == 1 + 3 * b  # the o run stops before o
    assert fast_calls["q"] == 1 + 2 * b  # o and gate/up runs compute attention; down and outputs replay it
    assert fast_calls["o"] == 1 + 1 * b


def test_options_come_from_any_method_config():
    from qingzhou.compress.prune.structured import StructuredConfig
    from qingzhou.compress.quantize.gptq import GPTQConfig
    from qingzhou.compress.quantize.smoothquant import SmoothQuantConfig

    opts = LayerwiseOptions.from_config(GPTQConfig(device="cpu", batch_size=3, offload_inputs=True,
                                                   true_sequential=False), targets=str.isidentifier)
    assert (opts.device, opts.batch_size, opts.offload_inputs, opts.true_sequential) == ("cpu", 3, True, False)
    assert opts.targets is str.isidentifier and opts.reuse_outputs is True
    assert LayerwiseOptions.from_config(SmoothQuantConfig()).true_sequential is True  # no such field: default
    structured = LayerwiseOptions.from_config(StructuredConfig(batch_size=2), true_sequential=False)
    assert (structured.batch_size, structured.true_sequential, structured.device) == (2, False, None)


def test_unavailable_or_unknown_device_is_a_device_error_before_any_work():
    from qingzhou.errors import DeviceError
    from qingzhou.llm.devices import CAPABILITIES, is_available

    missing = next((d for d in CAPABILITIES if not is_available(d)), None)
    model = tiny_model("llama")
    rec = Recorder()
    if missing is not None:
        with pytest.raises(DeviceError, match=f"device '{missing}' was requested but is not available"):
            run_layerwise(model, _samples(n=2), rec, LayerwiseOptions(device=missing))
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        run_layerwise(model, _samples(n=2), rec, LayerwiseOptions(device="gpu"))
    assert rec.tokens == {} and rec.layer_inputs == []


def test_finish_group_receives_the_layers_own_modules():
    model = tiny_model("qwen2")
    seen = []

    class Check(Recorder):
        def finish_group(self, index, layer, modules):
            super().finish_group(index, layer, modules)
            for name, module in modules.items():
                assert module is model.get_submodule(name) and isinstance(module, nn.Linear)
                assert any(module is m for m in layer.modules())
                seen.append(name)

    run_layerwise(model, _samples(n=2), Check(), LayerwiseOptions(device="cpu"))
    assert len(seen) == 14 and len(set(seen)) == 14


def test_observation_pass_sees_the_layer_before_any_group_is_rewritten():
    """`inputs_to_observe` hands the named submodules' inputs (a child block called with keywords,
    and a linear) to `observe` on the layer's weights before `begin_layer` and any group: o_proj's
    observed input is the attention output of the *original* v_proj, while the group pass sees the
    zeroed one."""
    events = []

    class Observer(Recorder):
        def __init__(self):
            super().__init__()
            self.observed: dict[tuple[int, str], list[torch.Tensor]] = {}
            self.index = -1

        def inputs_to_observe(self, index, layer):
            self.index = index
            events.append(("observe?", index))
            return ["self_attn", "self_attn.o_proj"]

        def observe(self, name, module, x):
            self.observed.setdefault((self.index, name), []).append(x.clone())

        def begin_layer(self, index, layer, inputs):
            events.append(("begin", index))
            super().begin_layer(index, layer, inputs)

        def finish_group(self, index, layer, modules):
            super().finish_group(index, layer, modules)
            if any(n.endswith("v_proj") for n in modules):
                layer.self_attn.v_proj.weight.zero_()

    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    obs = Observer()
    run_layerwise(model, _samples(), obs, LayerwiseOptions(device="cpu", batch_size=4))
    assert events == [("observe?", 0), ("begin", 0), ("observe?", 1), ("begin", 1)]
    layer0 = reference.model.layers[0]
    with torch.no_grad():
        attn_in = layer0.input_layernorm(obs.layer_inputs[0])
    torch.testing.assert_close(torch.cat(obs.observed[(0, "self_attn")]), attn_in.reshape(-1, 64))
    observed_o = torch.cat(obs.observed[(0, "self_attn.o_proj")])
    assert observed_o.shape == (6 * 24, 64) and observed_o.abs().max() > 0
    assert torch.cat(obs.inputs["model.layers.0.self_attn.o_proj"]).abs().max() == 0


def test_report_carries_peak_memory_from_the_device_layer():
    from qingzhou.llm.devices import peak_memory_mb

    report = run_layerwise(tiny_model("llama"), _samples(n=2), Recorder(), LayerwiseOptions(device="cpu"))
    assert report.device == "cpu" and report.peak_memory_kind == "process peak RSS"
    assert 10 < report.peak_memory_mb <= peak_memory_mb("cpu")  # a peak RSS never shrinks
