"""`fit`'s calibration of per-linear proxy losses against measured end-to-end KL (`kl_scale.py`)."""
from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

from qingzhou.compress.fit.kl_scale import fit_factors, kl_factors, layer_and_kind, reference_option
from qingzhou.compress.fit.storage import Option, option_space, options_for

pytestmark = pytest.mark.usefixtures("one_thread")
TWO = Option(2, 32)


def test_fit_factors_recover_a_product_of_layer_and_kind_factors():
    gen = torch.Generator().manual_seed(0)
    layers, kinds = range(5), ["q", "k", "down"]
    a = {L: float(torch.rand(1, generator=gen)) * 10 + 0.1 for L in layers}
    b = {T: float(torch.rand(1, generator=gen)) * 3 + 0.1 for T in kinds}
    pred = {(L, T): float(torch.rand(1, generator=gen)) + 0.05 for L in layers for T in kinds if (L, T) != (2, "k")}
    kl_layer = {L: sum(a[L] * b[T] * p for (l2, T), p in pred.items() if l2 == L) for L in layers}
    kl_kind = {T: sum(a[L] * b[T] * p for (L, t2), p in pred.items() if t2 == T) for T in kinds}
    got = fit_factors(pred, kl_layer, kl_kind)
    assert set(got) == set(pred)  # a missing cell (layer 2 has no k) is fine
    for cell, f in got.items():
        assert f == pytest.approx(a[cell[0]] * b[cell[1]], rel=1e-6)


def test_layer_and_kind_and_reference_option():
    assert layer_and_kind("model.layers.12.self_attn.q_proj", "model.layers") == (12, "self_attn.q_proj")
    assert layer_and_kind("model.layers.3.mlp.experts.7.down_proj", "model.layers") == (3, "mlp.experts.*.down_proj")
    assert layer_and_kind("lm_head", "model.layers") is None
    assert reference_option(options_for(576, option_space())) == Option(3, 64)
    assert reference_option(options_for(64, option_space())) == Option(3, 32)
    assert reference_option([Option()]) is None


def test_calibrated_losses_predict_the_measured_kl_of_other_plans():
    """The factors come from plans at the reference option (3 bits); they must also make the
    proxy predict the held-out KL of 2-bit plans (one layer, or one kind of linear, at a time)
    far better than the proxy as measured. The proxy here is the raw output error (no Fisher), whose
    units differ from kind to kind; on Gemma 3 270M the Fisher-weighted proxy was as far off."""
    from qingzhou.compress.calibrate import LayerwiseOptions
    from qingzhou.compress.fit.api import heldout_kl
    from qingzhou.compress.fit.sensitivity import SensitivityCollector, measure_sensitivity
    from qingzhou.compress.quantize.registry import QUANTIZERS
    from qingzhou.finetune.testing import tiny_model

    model = tiny_model("gemma3_text", num_hidden_layers=4)
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(5, 272, (64,), generator=gen) for _ in range(10)]
    measure, held = samples[:8], samples[8:]
    lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    collector = SensitivityCollector(option_space(), keep_weights=True)
    sens = measure_sensitivity(model, measure, collector=collector,
                               layerwise=LayerwiseOptions(targets=lin.__contains__, true_sequential=False))
    cfg = QUANTIZERS.validate({"method": "rtn"})
    work = copy.deepcopy(model)
    factors, info = kl_factors(sens, collector.weights,
                               lambda plans: heldout_kl(model, work, held, plans, collector.weights, cfg), "model.layers")
    assert set(factors) == set(lin) and info["plans"] == 4 + 7 and info["reference"] == ["w3g32", "w3g64"]  # down_proj is 128 wide
    two = Option(2, 32)
    plans = [{n: two for n in lin if layer_and_kind(n, "model.layers")[0] == L} for L in range(4)]
    plans += [{n: two for n in lin if n.endswith(k)} for k in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj")]
    kls = heldout_kl(model, work, held, plans, collector.weights, cfg)
    # each plan names only its own linears: the others are original whatever the plan before wrote
    assert heldout_kl(model, work, held, plans[1:2], collector.weights, cfg)[0] == pytest.approx(kls[1], rel=1e-5)
    assert heldout_kl(model, work, held, plans[-1:], collector.weights, cfg)[0] == pytest.approx(kls[-1], rel=1e-5)
    raw = [sum(sens[n].errors[two] for n in p) for p in plans]
    cal = [sum(sens[n].errors[two] * factors[n] for n in p) for p in plans]
    spread_raw = statistics.pstdev([math.log(k / r) for k, r in zip(kls, raw)])
    spread_cal = statistics.pstdev([math.log(k / c) for k, c in zip(kls, cal)])
    assert spread_cal < 0.4 and spread_cal < 0.5 * spread_raw, (spread_raw, spread_cal)
    # the weights of `model` are untouched
    for n, m in lin.items():
        assert torch.equal(m.weight, dict(tiny_model("gemma3_text", num_hidden_layers=4).named_modules())[n].weight)


def test_fit_records_the_calibration_and_can_skip_it():
    from qingzhou.compress.fit import Budget, fit
    from qingzhou.finetune.testing import tiny_model

    gen = torch.Generator().manual_seed(2)
    calib = [torch.randint(5, 272, (32,), generator=gen) for _ in range(6)]
    report = fit(tiny_model("llama"), Budget(avg_bits=4.0), {"method": "rtn"}, calib, apply=False, neighbours=())
    cal = report.kl_calibration
    assert set(cal["layer_kl"]) == {0, 1} and len(cal["kind_kl"]) == 7
    assert set(cal["factors"]) == set(report.sensitivities) and all(f > 0 for f in cal["factors"].values())
    assert "kl_calibrate" in report.seconds
    plain = fit(tiny_model("llama"), Budget(avg_bits=4.0), {"method": "rtn"}, calib, apply=False, neighbours=(),
                kl_calibrate=0)
    assert plain.kl_calibration == {} and "kl_calibrate" not in plain.seconds
    assert plain.loss == pytest.approx(sum(plain.sensitivities[n].errors[o] for n, o in plain.choice.items()))


def _two_bit_weights(model, seed: int, vocab: int, length: int):
    """6 random samples, the decoder linears, and every linear's 2-bit g32 RTN weights measured on
    the first 4 samples (`heldout_kl`'s input)."""
    from qingzhou.compress.calibrate import LayerwiseOptions
    from qingzhou.compress.fit.sensitivity import SensitivityCollector, measure_sensitivity

    gen = torch.Generator().manual_seed(seed)
    samples = [torch.randint(5, vocab, (length,), generator=gen) for _ in range(6)]
    lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    collector = SensitivityCollector([TWO], keep_weights=True)
    measure_sensitivity(model, samples[:4], collector=collector,
                        layerwise=LayerwiseOptions(targets=lin.__contains__, true_sequential=False))
    return samples, lin, collector.weights


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_replaying_unchanged_layers_gives_the_same_kl(arch):
    """`heldout_kl` starts a plan at the lowest layer it changes, the layers below playing back the
    reference's recorded outputs: each plan's KL must equal the full forward's, for plans starting
    at every layer, a plan touching two layers, one dropping a layer, and `work` as it is."""
    from qingzhou.compress.fit.api import heldout_kl
    from qingzhou.compress.fit.solve import DROPPED
    from qingzhou.compress.quantize.registry import QUANTIZERS
    from qingzhou.finetune.testing import tiny_model

    model = tiny_model(arch, num_hidden_layers=4)
    samples, lin, weights = _two_bit_weights(model, seed=2, vocab=200, length=48)
    two = TWO
    cfg = QUANTIZERS.validate({"method": "rtn"})
    work = copy.deepcopy(model)
    layer = [{n: two for n in lin if layer_and_kind(n, "model.layers")[0] == L} for L in range(4)]
    plans = [*layer, {**layer[1], **layer[3]}, {**layer[3], **{n: DROPPED for n in layer[2]}}, None]
    drops = [[], [], [], [], [], [2], []]
    fast = heldout_kl(model, work, samples[4:], plans, weights, cfg, drops=drops)
    slow = heldout_kl(model, work, samples[4:], plans, weights, cfg, drops=drops, replay=False)
    assert fast == pytest.approx(slow, rel=1e-6, abs=1e-9)
    assert all(k > 0 for k in fast)  # None: `work` as the plan before left it, run from layer 0
    # the class's forward is back on every layer: a plain forward equals the reference
    ids = samples[5][None]
    assert torch.allclose(work(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("arch,overrides,chunked", [
    ("llama", {}, True), ("llama", {"tie_word_embeddings": True}, True),
    ("gemma3_text", {"final_logit_softcapping": 30.0}, False),  # soft-capped logits: the full-logits path
], ids=["llama", "tied-head", "softcap"])
def test_heldout_kl_equals_the_kl_of_the_full_logits(monkeypatch, arch, overrides, chunked):
    """`heldout_kl` through the head in vocabulary chunks (4 chunks of 64 rows and a ragged one of
    16 here) is the mean per-token KL of the two models' full logits, for plans written into the
    copy; models whose logits are more than the linear head take the full-logits path."""
    import torch.nn.functional as F

    from qingzhou.compress.fit import head_kl
    from qingzhou.compress.fit.api import heldout_kl
    from qingzhou.compress.quantize.registry import QUANTIZERS
    from qingzhou.finetune.testing import tiny_model

    monkeypatch.setattr(head_kl, "VOCAB_CHUNK", 64)
    model = tiny_model(arch, **overrides)
    samples, lin, weights = _two_bit_weights(model, seed=3, vocab=272, length=40)
    work = copy.deepcopy(model)
    assert (head_kl.shared_head(model, work, weights) is not None) == chunked
    plans = [{n: TWO for n in lin if ".0." in n}, {n: TWO for n in lin if n.endswith("down_proj")}]
    got = heldout_kl(model, work, samples[4:], plans, weights, QUANTIZERS.validate({"method": "rtn"}))
    for plan, kl in zip(plans, got):
        planned = copy.deepcopy(model)
        with torch.no_grad():
            for n, o in plan.items():
                planned.get_submodule(n).weight.copy_(weights[n][o].dequantize())
            planned, ref = planned.double(), copy.deepcopy(model).double()  # float64: the truth both paths round
            total = sum(float(F.kl_div(F.log_softmax(planned(input_ids=s[None]).logits, -1),
                                       F.log_softmax(ref(input_ids=s[None]).logits, -1), log_target=True,
                                       reduction="sum")) for s in samples[4:])
        assert kl > 1e-5 and kl == pytest.approx(total / 80, rel=1e-3), (kl, total / 80)


def test_reference_cache_skips_the_reference_where_no_plan_replays_it():
    """With `reference_cache`, a second call whose plans all start at layer 0 takes the reference's
    terms from the cache (the reference model is not run: a different one gives the same KLs), and
    they equal the first call's; a plan that replays layers still runs the reference."""
    from qingzhou.compress.fit.api import heldout_kl
    from qingzhou.compress.quantize.registry import QUANTIZERS
    from qingzhou.finetune.testing import tiny_model

    model = tiny_model("llama")
    samples, lin, weights = _two_bit_weights(model, seed=4, vocab=272, length=32)
    two = TWO
    cfg = QUANTIZERS.validate({"method": "rtn"})
    work, other = copy.deepcopy(model), copy.deepcopy(model)  # `other`: the same head, another layer 0
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    from_zero = [{n: two for n in lin if ".0." in n}]  # changes layer 0: nothing is replayed
    from_one = [{n: two for n in lin if ".1." in n}]  # replays layer 0 from the reference
    cache: dict = {}
    first = heldout_kl(model, work, samples[4:], from_zero, weights, cfg, reference_cache=cache)
    assert sorted(cache) == [0, 1]
    assert heldout_kl(other, work, samples[4:], from_zero, weights, cfg, reference_cache=cache) == first
    plain = heldout_kl(model, work, samples[4:], from_one, weights, cfg)
    assert heldout_kl(model, work, samples[4:], from_one, weights, cfg, reference_cache=cache) == plain
    assert heldout_kl(other, work, samples[4:], from_one, weights, cfg, reference_cache=cache) != plain
