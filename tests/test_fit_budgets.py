"""Issue 21, `fit` as a verb: each budget kind is met by the files it writes, an unreachable budget
names the smallest reachable value, the plan recipe reproduces the weights bit for bit, and the
CLI refuses a bad budget before any model loads."""
from __future__ import annotations

import json
import re
import struct

import pytest
import yaml
from typer.testing import CliRunner

from qingzhou.compress.fit.budget import Budget, parse_size
from qingzhou.errors import RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")


def _header(path):
    """(header length, {tensor: (dtype, shape, nbytes)}) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return n, {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


def _calib(n=6, length=32, seed=1):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 272, (length,), generator=gen) for _ in range(n)]


def _linears(model):
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_parse_size_and_budget_rules():
    assert parse_size("80MB") == 80_000_000
    assert parse_size("75MiB") == 75 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("512 kib") == 512 * 1024
    assert parse_size(123456) == 123456
    for bad in ("80 parsecs", "-5MB", "MB", "0"):
        with pytest.raises(RecipeError):
            parse_size(bad)
    assert Budget.parse("80MB") == Budget(max_size=80_000_000)
    assert Budget.parse({"avg_bits": 3.5}).kind == "avg_bits"
    assert Budget.parse({"min_tok_s": 40, "device": "cpu"}).device == "cpu"
    with pytest.raises(RecipeError, match="exactly one budget"):
        Budget(max_size=10**6, avg_bits=3)
    with pytest.raises(RecipeError, match="exactly one budget"):
        Budget()
    with pytest.raises(RecipeError, match="device applies only"):
        Budget(avg_bits=3, device="cpu")
    with pytest.raises(RecipeError, match="between 1 and 32"):
        Budget(avg_bits=0.5)


def test_max_size_budget_holds_for_the_written_file_and_unreachable_names_smallest(tmp_path):
    from qingzhou.compress.fit import fit
    from qingzhou.finetune.testing import tiny_model

    model = tiny_model("qwen2")
    widths = {n: m.in_features for n, m in _linears(model).items()}
    with pytest.raises(RecipeError, match=r"smallest reachable size is (\d+) bytes") as info:
        fit(model, 1000, {"method": "rtn"}, _calib(), apply=False)
    smallest = int(re.search(r"smallest reachable size is (\d+) bytes", str(info.value)).group(1))
    assert smallest > 1000
    # exactly the smallest reachable size is reachable, and the written file fits in it
    report = fit(model, smallest, {"method": "rtn"}, _calib(), output_dir=tmp_path / "small", neighbours=())
    size = (tmp_path / "small" / "model.safetensors").stat().st_size
    assert report.file_bytes == size <= smallest
    # the cheapest option of every linear: 2 bits in the widest group its input width allows
    assert {n: (o.bits, o.group_size) for n, o in report.choice.items()} == {n: (2, min(w, 128)) for n, w in widths.items()}
    header_len, tensors = _header(tmp_path / "small" / "model.safetensors")
    assert sum(nb for _, _, nb in tensors.values()) == report.predicted_bytes
    # the header bound holds, and is loose only by the offsets' digits (at most a few per entry)
    assert 8 + header_len <= report.predicted_file_bytes - report.predicted_bytes <= 8 + header_len + 8 * len(tensors)


def test_avg_bits_budget_is_honoured_by_the_written_files(tmp_path):
    from qingzhou.compress.fit import fit
    from qingzhou.finetune.testing import tiny_model

    model = tiny_model("llama")
    lins = {n: (m.in_features * m.out_features) for n, m in _linears(model).items()}
    report = fit(model, Budget(avg_bits=3.3), {"method": "gptq", "batch_size": 2}, _calib(),
                 output_dir=tmp_path / "out", neighbours=(0.95, 1.05))
    _, tensors = _header(tmp_path / "out" / "model.safetensors")
    written = sum(nb for k, (_, _, nb) in tensors.items() if k.rpartition(".")[0] in lins)
    bits = 8 * written / sum(lins.values())
    assert bits == pytest.approx(report.avg_bits, rel=1e-12)
    assert bits <= 3.3
    assert len(report.mix()) > 1  # mixed widths, not a uniform setting
    proxy = next(c for c in report.candidates if c["factor"] == 1.0 and c["min_bits"] is None and not c["uniform"])
    assert proxy["avg_bits"] > 3.0  # the proxy plan spends the budget
    # the end-to-end check ran on every distinct candidate and picked among those within budget
    assert report.kl is not None and report.kl > 0 and report.kl_applied is not None
    assert all(c["kl"] is not None for c in report.candidates if c["eligible"])
    assert report.kl == min(c["kl"] for c in report.candidates if c["eligible"])
    over = next(c for c in report.candidates if c["factor"] == 1.05)
    assert over["avg_bits"] >= proxy["avg_bits"] and not over["eligible"]
    assert over["kl"] is None or over["same_as"] is not None  # over budget: solved, not run end to end
    with pytest.raises(RecipeError, match=r"lowest reachable average is [\d.]+ bits"):
        fit(tiny_model("llama"), Budget(avg_bits=1.5), {"method": "rtn"}, _calib(), apply=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["avg_bits"] == pytest.approx(report.avg_bits, abs=1e-4) and metrics["budget_avg_bits"] == 3.3
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    dynamic = config["quantization_config"]["dynamic"]
    for name, option in report.choice.items():  # GPTQModel's per-module `dynamic` map
        key = f"+:^{re.escape(name)}$"
        if option.keep:
            assert f"-:^{re.escape(name)}$" in dynamic
        elif (option.bits, option.group_size) != (config["quantization_config"]["bits"],
                                                   config["quantization_config"]["group_size"]):
            assert dynamic[key]["bits"] == option.bits and dynamic[key]["group_size"] == option.group_size


def test_plan_recipe_reproduces_the_fitted_weights(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    from qingzhou.recipes.runner import run_recipe

    recipe = tmp_path / "fit.yaml"
    recipe.write_text(yaml.safe_dump({"name": "f", "stages": [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"},
        {"kind": "fit", "method": "gptq", "avg_bits": 4.2, "neighbours": [0.97],
         "calibration": {"num_samples": 6, "seq_len": 32}, "batch_size": 2},
    ]}, sort_keys=False))
    run_recipe(str(recipe), tmp_path / "run", progress=False)
    fitted = tmp_path / "run" / "02-fit" / "model"
    plan = fitted / "plan.yaml"
    stages = yaml.safe_load(plan.read_text())["stages"]
    assert stages[0]["model"] == str(tiny_llama_dir) and stages[1]["kind"] == "quantize"
    fit_report = json.loads((fitted.parent / "fit_report.json").read_text())
    assert len(stages[1]["overrides"]) == len(fit_report["choice"])
    assert set(fit_report["kl_calibration"]["factors"]) == set(fit_report["choice"])  # on by default
    run_recipe(str(plan), tmp_path / "again", progress=False)
    a = load_file(str(fitted / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "02-quantize" / "model" / "model.safetensors"))
    assert set(a) == set(b)
    quantized = [k for k in a if k.endswith(".qweight")]
    assert quantized
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bool((a[k] == b[k]).all()), k
    bits = {a[k].shape[0] * 32 // a[k.replace("qweight", "g_idx")].shape[0] for k in quantized}  # rows = in/32 * bits
    assert len(bits) > 1, bits  # a mixed plan, reproduced


def test_speed_budget_uses_a_cached_timing_table(tmp_path):
    from qingzhou.compress.fit import fit
    from qingzhou.compress.fit.timing import CACHE_FILE
    from qingzhou.finetune.testing import tiny_model

    model = tiny_model("llama")
    with pytest.raises(RecipeError, match=r"highest reachable speed is [\d.]+ tokens/s"):
        fit(model, Budget(min_tok_s=1e9, device="cpu"), {"method": "rtn"}, _calib(), apply=False,
            timing_cache=tmp_path)
    table = json.loads((tmp_path / CACHE_FILE).read_text())
    assert table and all(v > 0 for v in table.values())
    assert any("|keep" in k for k in table) and any("|w2g32" in k for k in table)
    # a lax speed budget: the plan's predicted speed meets it; nothing is re-timed
    before = (tmp_path / CACHE_FILE).stat().st_mtime_ns
    report = fit(model, Budget(min_tok_s=1.0, device="cpu"), {"method": "rtn"}, _calib(), apply=False,
                 timing_cache=tmp_path, neighbours=())
    assert report.predicted_tok_s >= 1.0
    chosen = next(c for c in report.candidates if c["chosen"])
    assert report.predicted_tok_s == pytest.approx(1e9 / chosen["cost"])  # cost: ns per decode step, rest included
    assert (tmp_path / CACHE_FILE).stat().st_mtime_ns == before


def _one_paragraph(r) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.stderr


@pytest.mark.parametrize("args, flag", [
    (["--max-size", "80parsecs"], "--max-size"),
    ([], "budget"),
    (["--max-size", "80MB", "--avg-bits", "3.5"], "exactly one budget"),
    (["--avg-bits", "0.5"], "--avg-bits"),
    (["--min-tok-s", "-3", "--device", "cpu"], "--min-tok-s"),
    (["--avg-bits", "3", "--method", "awq"], "--method"),
    (["--min-tok-s", "40", "--device", "cpu", "--drop-layers", "2"], "--drop-layers"),
])
def test_cli_bad_budget_exits_2_before_loading(tmp_path, args, flag):
    from qingzhou.cli.main import app

    # the model does not exist: the budget must be refused first
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "no-such-model"), str(tmp_path / "out"), *args],
                           catch_exceptions=False)
    text = _one_paragraph(r)
    assert flag in text and "no-such-model" not in text
    assert not (tmp_path / "out").exists()


def test_fit_stage_needs_exactly_one_budget(tmp_path):
    from qingzhou.recipes.schema import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "stages": [{"kind": "load", "model": "smollm2"},
                                                            {"kind": "fit", "method": "gptq"}]}))
    with pytest.raises(RecipeError, match="exactly one budget"):
        load_recipe(str(path))
    path.write_text(yaml.safe_dump({"name": "f", "stages": [{"kind": "load", "model": "smollm2"},
                                                            {"kind": "fit", "max_size": "80MB", "method": "awq"}]}))
    with pytest.raises(RecipeError, match="gptq or rtn"):
        load_recipe(str(path))


def test_pareto_plot_and_front(tmp_path):
    from qingzhou.compress.fit.plot import pareto_front, pareto_plot

    rows = [{"label": "fit 3b", "size_mb": 70.0, "ppl": 27.0, "kind": "fit"},
            {"label": "fit 4b", "size_bytes": 90_000_000, "ppl": 22.0, "kind": "fit"},
            {"label": "w3g64", "size_mb": 71.0, "ppl": 32.3, "kind": "uniform"},
            {"label": "Q3_K_M", "size_mb": 75.0, "ppl": 26.0, "kind": "llama.cpp"},
            {"label": "none", "size_mb": 60.0, "ppl": None, "kind": "peer"}]
    assert [r["label"] for r in pareto_front([r for r in rows if r["ppl"] is not None])] == ["fit 3b", "Q3_K_M", "fit 4b"]
    out = pareto_plot(rows, tmp_path / "p" / "pareto.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    # the bench's options: joining another kind's points and a reference line each change the picture
    rows.append({"label": "w4g64", "size_mb": 88.0, "ppl": 23.0, "kind": "uniform"})
    plain = pareto_plot(rows, tmp_path / "plain.png").read_bytes()
    joined = pareto_plot(rows, tmp_path / "joined.png", joined=("fit", "uniform")).read_bytes()
    dense = pareto_plot(rows, tmp_path / "dense.png", reference=("dense", 20.4)).read_bytes()
    logged = pareto_plot(rows, tmp_path / "log.png", log_y=True, xlabel="decoder linears (MB)").read_bytes()
    assert len({plain, joined, dense, logged}) == 4


def test_min_bits_candidate_has_no_narrow_linear_and_competes_on_kl():
    from qingzhou.compress.fit import fit
    from qingzhou.finetune.testing import tiny_model

    # a budget tight enough that the unrestricted plan takes some 2-bit linears
    report = fit(tiny_model("llama"), Budget(avg_bits=4.0), {"method": "rtn"}, _calib(), apply=False,
                 neighbours=(), min_bits=(3,), kl_calibrate=0)
    full = next(c for c in report.candidates if c["min_bits"] is None)
    narrow = next(c for c in report.candidates if c["min_bits"] == 3)
    assert any(k.startswith("w2") for k in full["mix"])
    assert narrow["mix"] and not any(k.startswith("w2") for k in narrow["mix"])
    assert narrow["avg_bits"] <= 4.0 and narrow["eligible"]
    # the proxy prefers the unrestricted plan (it is the optimum of the summed errors) ...
    assert full["loss"] <= narrow["loss"]
    # ... and the plan of least held-out KL is the one applied
    winner = min((c for c in report.candidates if c["eligible"]), key=lambda c: c["kl"])
    assert report.kl == winner["kl"] and next(c for c in report.candidates if c["chosen"]) is winner
    without = fit(tiny_model("llama"), Budget(avg_bits=4.0), {"method": "rtn"}, _calib(), apply=False,
                  neighbours=(), min_bits=())
    assert [(c["min_bits"], c["uniform"]) for c in without.candidates] == [(None, False), (None, True)]
    # the best uniform setting within the budget is always a KL-checked candidate
    same = next(c for c in report.candidates if c["uniform"])
    assert len(same["mix"]) == 1 and same["eligible"] and same["avg_bits"] <= 4.0 and same["kl"] is not None
    assert same["name"] == f"uniform {next(iter(same['mix']))}"
    assert same["loss"] >= full["loss"]  # the knapsack's optimum is never worse on its own proxy


def test_uniform_bytes_bounds_the_uniform_file_and_fit_affords_it(tmp_path):
    from qingzhou.compress.fit import fit, uniform_bytes
    from qingzhou.compress.quantize.api import quantize
    from qingzhou.finetune.testing import tiny_model
    from qingzhou.llm.quantized.gptq_layout import WEIGHTS, save_quantized

    size = uniform_bytes(tiny_model("llama"), 3, 64)
    uniform = tiny_model("llama")
    quantize(uniform, {"method": "rtn", "bits": 3, "group_size": 64})
    save_quantized(uniform, None, tmp_path / "u")
    written = (tmp_path / "u" / WEIGHTS).stat().st_size
    assert written <= size <= written + 512
    report = fit(tiny_model("llama"), size, {"method": "rtn"}, _calib(), apply=False, neighbours=(0.95,))
    assert report.predicted_file_bytes <= size
    # the neighbour has 5% less room for the linears (not 5% of a file mostly made of embeddings)
    by = {c["factor"]: c for c in report.candidates if c["min_bits"] is None and not c["uniform"]}
    fixed = report.plan.cost - sum(report.sensitivities[n].cost(o) for n, o in report.plan.choice.items()
                                   if n in report.sensitivities)
    room = size - (report.predicted_file_bytes - report.predicted_bytes) - fixed
    assert by[0.95]["payload_bytes"] - fixed <= 0.95 * room < by[1.0]["payload_bytes"] - fixed + 0.05 * room
    from qingzhou.compress.fit.storage import Option

    factor = report.kl_calibration["factors"]  # the losses the solver adds up: the proxy scaled by kl_scale
    uniform_loss = sum(s.errors[Option(3, 64)] * factor[n] for n, s in report.sensitivities.items())  # 64 divides 64 and 128
    # the uniform candidate is that very setting: its own header is exact, so it fits the file it came from
    same = next(c for c in report.candidates if c["uniform"])
    assert same["mix"] == {"w3g64": len(report.sensitivities)} and same["eligible"] and same["kl"] is not None
    assert report.loss <= uniform_loss  # the plan is never worse (by the measured loss) than uniform at its size


def test_cli_fit_writes_the_model_and_its_plan(tmp_path, tiny_llama_dir):
    from qingzhou.cli.main import app

    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["fit", str(tiny_llama_dir), str(out), "--avg-bits", "4", "--method", "gptq",
                                 "--num-samples", "4", "--seq-len", "32", "--device", "cpu", "--kl-calibrate", "0",
                                 "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["budget_avg_bits"] == 4 and summary["avg_bits"] <= 4
    assert summary["file_bytes"] == (out / "model.safetensors").stat().st_size
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["stages"][0] == {"kind": "load", "model": str(tiny_llama_dir), "dtype": "float32"}
    assert plan["stages"][1]["method"] == "gptq" and plan["stages"][1]["overrides"]
    assert plan["stages"][1]["calibration"]["num_samples"] == 4 and plan["stages"][1]["device"] == "cpu"
    assert json.loads((out / "report.json").read_text())["kl_calibration"] == {}  # --kl-calibrate 0
