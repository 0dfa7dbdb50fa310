"""Issue 21 groundwork: the storage formula equals the written bytes, the knapsack solver is
optimal (brute force), and the measured per-option errors behave and equal a direct recomputation."""
from __future__ import annotations

import json
import random
import struct

import pytest

from qingzhou.compress.fit.solve import brute_force, solve_choice, total_cost
from qingzhou.compress.fit.storage import (
    KEEP,
    Option,
    header_bytes_bound,
    linear_bytes,
    model_bytes,
    option_space,
    options_for,
)
from qingzhou.errors import RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")


def _linears(model):
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _file_tensors(path):
    """(header length, {tensor name: nbytes}) of a safetensors file, read from its header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return n, {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


def _save_rtn(model, choices, tmp_path):
    """Quantise `model` with RTN at `choices` (per-module overrides, keep = skip) and save it."""
    import re

    from qingzhou.compress.quantize.api import quantize
    from qingzhou.llm.quantized.gptq_layout import WEIGHTS, save_quantized

    overrides = [{"pattern": f"^{re.escape(n)}$", "skip": True} if o.keep else
                 {"pattern": f"^{re.escape(n)}$", "bits": o.bits, "group_size": o.group_size}
                 for n, o in choices.items()]
    quantize(model, {"method": "rtn", "clip_search": False, "overrides": overrides, "on_indivisible_group": "error"})
    save_quantized(model, None, tmp_path)
    return tmp_path / WEIGHTS


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v carry a bias
@pytest.mark.parametrize("mix", ["w2g32", "w3g64", "w4g-1", "w8g32", "mixed"])
def test_storage_formula_equals_written_bytes(arch, mix, tmp_path):
    from qingzhou.finetune.testing import tiny_model

    model = tiny_model(arch)
    lins = _linears(model)
    rng = random.Random(f"{arch}{mix}")
    choices = {}
    for name, lin in lins.items():
        if mix == "mixed":
            choices[name] = rng.choice(options_for(lin.in_features, option_space()))
        else:
            bits, gs = mix[1:].split("g")
            choices[name] = Option(int(bits), int(gs))
    if mix == "mixed":
        choices[next(iter(lins))] = KEEP
        assert len({o for o in choices.values()}) > 3
    shapes = {n: (m.in_features, m.out_features, m.bias is not None) for n, m in lins.items()}
    predicted_total = model_bytes(model, choices)
    header_len, written = _file_tensors(_save_rtn(model, choices, tmp_path / "q"))
    for name, (in_f, out_f, has_bias) in shapes.items():
        got = sum(nb for k, nb in written.items() if k.rpartition(".")[0] == name)
        # float tensors are stored in 16 bits (gptq_layout.storage_dtype)
        expected = linear_bytes(in_f, out_f, choices[name], bias_bytes=2 if has_bias else 0, dtype_bytes=2)
        assert got == expected, (name, choices[name])
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert sum(written.values()) == predicted_total
    assert size - predicted_total == 8 + header_len


def test_storage_formula_values():
    # 3-bit, in=576, out=576, g64: qweight 18*3 rows, qzeros 9 groups x 18*3 words
    assert linear_bytes(576, 576, Option(3, 64)) == (54 * 576 + 9 * 54) * 4 + 9 * 576 * 2 + 576 * 4
    assert linear_bytes(100, 10, KEEP, bias_bytes=2, dtype_bytes=2) == 2000 + 20
    assert options_for(64, [Option(4, 128), Option(4, 64), Option(4, -1), KEEP]) == [Option(4, -1), KEEP]
    assert options_for(128, [Option(4, 128), Option(4, 32)]) == [Option(4, 128), Option(4, 32)]


def _random_table(rng, items, options, max_cost=60):
    return {f"l{i}": {f"o{j}": (rng.randint(1, max_cost), rng.random()) for j in range(rng.randint(1, options))}
            for i in range(rng.randint(1, items))}


def test_solver_matches_brute_force():
    rng = random.Random(21)
    for case in range(60):
        table = _random_table(rng, 5, 4)
        lo = sum(min(c for c, _ in t.values()) for t in table.values())
        hi = sum(max(c for c, _ in t.values()) for t in table.values())
        budget = rng.randint(lo, hi + 5)
        plan = solve_choice(table, budget)
        assert plan.exact
        assert total_cost(table, plan.choice) == plan.cost <= budget
        assert plan.loss == pytest.approx(sum(table[i][o][1] for i, o in plan.choice.items()))
        assert plan.loss == pytest.approx(brute_force(table, budget)), case


def test_solver_with_droppable_groups_matches_brute_force():
    """Whole groups (decoder layers) may be dropped: the DP is still exactly optimal over every
    keep/drop pattern, pays a kept group's own cost, and drops a group's items together."""
    from qingzhou.compress.fit.solve import DROPPED, Droppable

    rng = random.Random(7)
    drops = 0
    for case in range(80):
        table = {f"l{i}": {f"o{j}": (rng.randint(1, 60), rng.random()) for j in range(rng.randint(1, 3))}
                 for i in range(6)}
        items = list(table)
        groups = [Droppable(tuple(items[1:3]), rng.randint(0, 12), rng.uniform(0.0, 3.0)),
                  Droppable(tuple(items[4:6]), rng.randint(0, 12), rng.uniform(0.0, 3.0))]
        lo = sum(min(c for c, _ in table[i].values()) for i in (items[0], items[3]))
        hi = sum(max(c for c, _ in t.values()) for t in table.values()) + sum(g.cost for g in groups)
        budget = rng.randint(lo, hi)
        plan = solve_choice(table, budget, droppable=groups)
        kept = [g for g in groups if plan.choice[g.items[0]] != DROPPED]
        for g in groups:  # all or nothing
            assert len({plan.choice[i] == DROPPED for i in g.items}) == 1
        assert plan.cost == total_cost(table, plan.choice) + sum(g.cost for g in kept) <= budget
        want = sum(table[i][o][1] for i, o in plan.choice.items() if o != DROPPED)
        assert plan.loss == pytest.approx(want + sum(g.loss for g in groups if g not in kept))
        assert plan.loss == pytest.approx(brute_force(table, budget, groups)), case
        drops += len(groups) - len(kept)
    assert drops > 0  # the cases exercise dropping, not only keeping
    with pytest.raises(RecipeError, match="smallest reachable size"):
        solve_choice(table, lo - 1, droppable=groups)


def test_solver_coarse_grid_never_exceeds_budget():
    rng = random.Random(5)
    for _ in range(40):
        table = _random_table(rng, 5, 4, max_cost=500)
        lo = sum(min(c for c, _ in t.values()) for t in table.values())
        budget = lo + rng.randint(0, 800)
        plan = solve_choice(table, budget, resolution=37)
        assert plan.cost <= budget
        assert plan.loss >= brute_force(table, budget) - 1e-12
    # a tiny state table forces coarsening by itself and still fits
    table = _random_table(random.Random(1), 5, 4, max_cost=10_000)
    budget = sum(max(c for c, _ in t.values()) for t in table.values()) - 1
    plan = solve_choice(table, budget, max_states=16)
    assert not plan.exact or plan.resolution == 1
    assert plan.cost <= budget


def test_uniform_choice_is_the_best_shared_option_within_budget():
    from qingzhou.compress.fit.solve import uniform_choice

    rng = random.Random(8)
    for case in range(60):
        table = {f"l{i}": {f"o{j}": (rng.randint(1, 60), rng.random()) for j in range(4)} for i in range(4)}
        table["rest"] = {"keep": (rng.randint(1, 30), 0.0), "k2": (99, 0.0)}
        budget = rng.randint(40, 250)
        plan = uniform_choice(table, budget, fixed=("rest",))
        fits = [(sum(table[i][o][1] for i in table if i != "rest"), o) for o in ("o0", "o1", "o2", "o3")
                if sum(table[i][o][0] for i in table if i != "rest") + table["rest"]["keep"][0] <= budget]
        if not fits:
            assert plan is None, case
            continue
        loss, option = min(fits)
        assert plan.choice == {**{i: option for i in table if i != "rest"}, "rest": "keep"}, case
        assert plan.cost == total_cost(table, plan.choice) <= budget
        assert plan.loss == pytest.approx(loss)
    # an option not every item has is never the uniform one
    assert uniform_choice({"a": {"x": (1, 0.0)}, "b": {"y": (1, 0.0)}}, 10) is None


def test_solver_infeasible_budget_names_smallest_size():
    table = {"a": {"x": (100, 1.0), "y": (40, 5.0)}, "b": {"x": (30, 0.0), "y": (70, 0.0)}}
    assert solve_choice(table, 70).choice == {"a": "y", "b": "x"}
    with pytest.raises(RecipeError, match=r"smallest reachable size is 70 bytes"):
        solve_choice(table, 69)


@pytest.fixture(scope="module")
def measured():
    import torch

    from qingzhou.compress.calibrate import LayerwiseOptions
    from qingzhou.compress.fit.sensitivity import measure_sensitivity
    from qingzhou.finetune.testing import tiny_model

    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(5, 272, (48,), generator=gen) for _ in range(6)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = measure_sensitivity(model, samples, layerwise=LayerwiseOptions(device="cpu", batch_size=4))
    return model, samples, before, sens


def test_sensitivity_leaves_weights_and_orders_options(measured):
    import torch

    model, _, before, sens = measured
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(sens) == set(_linears(model))
    for name, s in sens.items():
        assert s.tokens == 6 * 48 and not s.unfed
        assert s.errors[KEEP] == 0.0
        groups = sorted({o.group_size for o in s.errors if not o.keep}, key=lambda g: g if g > 0 else 10**9)
        for o, e in s.errors.items():
            assert e >= 0
            if not o.keep:
                assert e > 0
        for g in groups:  # more bits: less error
            errs = [s.errors[Option(b, g)] for b in (2, 3, 4, 8)]
            assert all(a > b for a, b in zip(errs, errs[1:])), (name, g, errs)
        for b in (2, 3, 4, 8):  # smaller groups: less error
            errs = [s.errors[Option(b, g)] for g in groups]
            assert all(a < c for a, c in zip(errs, errs[1:])), (name, b, errs)


def test_sensitivity_equals_direct_recomputation(measured):
    import torch

    from qingzhou.llm.quantized.grid import QuantScheme, rtn_quantize_weight

    model, samples, _, sens = measured
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    xs = []
    handle = lin.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for s in samples:
            model(s[None])
    handle.remove()
    X = torch.cat(xs)
    H = 2 / X.shape[0] * X.T @ X
    w = lin.weight.detach().double()
    for o, err in sens[name].errors.items():
        if o.keep:
            continue
        q = rtn_quantize_weight(lin.weight, QuantScheme(o.bits, o.group_size)).dequantize().double()
        direct = float((((w - q) @ H) * (w - q)).sum())
        assert err == pytest.approx(direct, rel=1e-4), o


def test_solved_plan_beats_uniform_at_its_size(measured):
    model, _, _, sens = measured
    uniform = Option(4, 32)  # g64 on a 64-wide input is the per-channel layout (-1)
    budget = sum(s.cost(uniform) for s in sens.values())
    plan = solve_choice({n: s.table() for n, s in sens.items()}, budget)
    assert plan.cost <= budget
    uniform_loss = sum(s.errors[uniform] for s in sens.values())
    assert plan.loss <= uniform_loss
    assert len(set(plan.choice.values())) > 1  # the budget is spent unevenly, not uniformly


def test_fit_plan_quantizes_within_budget(tmp_path):
    import torch

    from qingzhou.compress.fit.api import fit
    from qingzhou.compress.quantize.api import quantize
    from qingzhou.finetune.testing import tiny_model
    from qingzhou.llm.quantized.gptq_layout import save_quantized

    model = tiny_model("qwen2")
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(5, 272, (32,), generator=gen) for _ in range(4)]
    lins = _linears(model)
    w3 = model_bytes(model, {n: Option(3, 32) for n in lins})
    w4 = model_bytes(model, {n: Option(4, 32) for n in lins})
    # the budget is the file (payload + header): the header bound on top keeps the payload midway
    budget = (w3 + w4) // 2 + header_bytes_bound(model, {n: option_space() for n in lins})
    with pytest.raises(RecipeError, match="smallest reachable size"):
        fit(model, model_bytes(model, {n: Option(2, -1) for n in lins}) - 1, {"method": "rtn"}, calib, apply=False)
    result = fit(model, budget, {"method": "rtn"}, calib, apply=False, neighbours=())
    assert set(result.choice) == set(lins)
    stages = {k: v for k, v in result.seconds.items() if k != "total"}
    assert {"fisher", "sensitivity", "solve", "kl_check"} <= set(stages)
    assert sum(stages.values()) <= result.seconds["total"] + 0.03  # each stage counted once (2-decimal rounding)
    assert w3 < result.predicted_bytes <= budget  # spends the budget: more than the 3-bit plan
    assert len(set(result.choice.values())) > 1
    quantize(model, result.quantize_config())
    save_quantized(model, None, tmp_path / "q")
    header_len, written = _file_tensors(tmp_path / "q" / "model.safetensors")
    assert sum(written.values()) == result.predicted_bytes <= budget


def test_gptq_option_errors_equal_the_solver_option_by_option():
    """The batched measurement is GPTQ itself: same codes and grid as `gptq_quantize_weight`
    (static groups) for every option, and the error is tr((W-Q) H (W-Q)^T) of that result."""
    import torch

    from qingzhou.compress.fit.gptq_options import gptq_option_errors
    from qingzhou.compress.quantize.gptq_solver import gptq_quantize_weight
    from qingzhou.llm.quantized.grid import QuantScheme

    gen = torch.Generator().manual_seed(3)
    X = torch.randn(512, 128, generator=gen) * torch.rand(128, generator=gen) * 3
    H = 2 / X.shape[0] * X.T @ X
    H[5, :] = H[:, 5] = 0  # a dead input channel
    W = torch.randn(48, 128, generator=gen) * 0.05
    options = [Option(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128)] + [KEEP]
    res = gptq_option_errors(W, H, options, keep_weights=True, block_size=32)
    assert set(res) == set(options) - {KEEP}
    errors = []
    for o, r in res.items():
        ref = gptq_quantize_weight(W, H, QuantScheme(o.bits, o.group_size), block_size=32, static_groups=True,
                                   hessian_clip=True)
        assert torch.equal(r.quantized.codes, ref.quantized.codes), o
        assert torch.equal(r.quantized.scales, ref.quantized.scales) and torch.equal(r.quantized.zeros, ref.quantized.zeros)
        E = W - ref.weight
        assert r.error == pytest.approx(float(((E @ H) * E).sum()), rel=1e-5)
        errors.append((o, r.error))
    # options solved in chunks (bounded memory) give the same results
    chunked = gptq_option_errors(W, H, options, keep_weights=True, block_size=32, max_elements=48 * 128 * 5)
    assert all(torch.equal(chunked[o].quantized.codes, r.quantized.codes) and chunked[o].error == pytest.approx(r.error, rel=1e-6)
               for o, r in res.items())
    # GPTQ beats RTN on the output error it minimises, at every option
    from qingzhou.llm.quantized.grid import rtn_quantize_weight

    for o, e in errors:
        q = rtn_quantize_weight(W, QuantScheme(o.bits, o.group_size)).dequantize()
        assert e < float((((W - q) @ H) * (W - q)).sum()), o


def test_row_weighted_gptq_errors_are_each_rows_error_times_its_weight():
    """With row weights the error is sum_r w_r * (row r's share of tr((W-Q) H (W-Q)^T))."""
    import torch

    from qingzhou.compress.fit.gptq_options import gptq_option_errors

    gen = torch.Generator().manual_seed(4)
    X = torch.randn(256, 64, generator=gen)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(24, 64, generator=gen) * 0.05
    rw = torch.rand(24, generator=gen) * 10
    options = [Option(3, 32), Option(4, 64)]
    plain = gptq_option_errors(W, H, options, keep_weights=True, block_size=16)
    weighted = gptq_option_errors(W, H, options, block_size=16, row_weights=rw)
    for o in options:
        E = W - plain[o].quantized.dequantize()
        rows = ((E @ H) * E).sum(1)
        assert weighted[o].error == pytest.approx(float((rows * rw).sum()), rel=1e-4)
        assert plain[o].error == pytest.approx(float(rows.sum()), rel=1e-5)


def test_output_fisher_is_the_mean_squared_loss_gradient_at_each_output():
    import torch
    import torch.nn.functional as F

    from qingzhou.compress.fit.fisher import output_fisher
    from qingzhou.finetune.testing import tiny_model

    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(5, 272, (24,), generator=gen) for _ in range(3)]
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    flags = [p.requires_grad for p in model.parameters()]
    fisher = output_fisher(model, samples, names)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    # direct: keep each output, backward the summed next-token loss, average the squared gradients
    outs, ref = {}, {n: 0.0 for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o)) for n in names]
    for s in samples:
        model.zero_grad()
        logits = model(input_ids=s[None], use_cache=False).logits[0, :-1]
        grads = torch.autograd.grad(F.cross_entropy(logits, s[1:], reduction="sum"), [outs[n] for n in names])
        for n, g in zip(names, grads):
            ref[n] = ref[n] + g[0].square().sum(0)
    for h in hooks:
        h.remove()
    for n in names:
        assert fisher[n].shape == (model.get_submodule(n).out_features,)
        assert torch.allclose(fisher[n], ref[n] / 72, rtol=1e-4, atol=1e-12), n
        assert float(fisher[n].sum()) > 0
    # under bf16 autocast (fit's default, ~3x faster on CPU) the weights are the same to bf16 rounding
    fast = output_fisher(model, samples, names, autocast="bfloat16")
    for n in names:
        assert fast[n].dtype == torch.float32
        assert torch.allclose(fast[n], fisher[n], rtol=0.1, atol=1e-3 * float(fisher[n].max())), n
        assert torch.corrcoef(torch.stack([fast[n], fisher[n]]))[0, 1] > 0.99
