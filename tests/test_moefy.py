"""MoEfication on tiny random models: e == k is the dense model, the partition is exact and
balanced, routers beat chance, generate() runs, the saved folder reloads (dense and MoE), and the
`kind: moefy` stage and `qingzhou moefy` command work."""
from __future__ import annotations

import copy
import json

import pydantic
import pytest
import torch
import yaml
from typer.testing import CliRunner

from qingzhou.compress.moefy import MoEMLP, apply_moefication, load_moefied, moefy, save_moefied, set_top_k
from qingzhou.compress.moefy.cluster import balanced_kmeans, balanced_sizes
from qingzhou.compress.moefy.config import MoefyConfig
from qingzhou.errors import ModelLoadError
from qingzhou.finetune.testing import byte_tokenizer, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def calib(n: int = 8, length: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 272, (length,), generator=g) for _ in range(n)]


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(5, 272, (2, 24), generator=torch.Generator().manual_seed(seed))


FAST = {"router_steps": 150}
TEXT = "The grid operator balances supply and demand every second of the day. " * 30


def write_text(tmp_path) -> str:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("router", ["centroid", "trained"])
def test_all_experts_reproduce_dense_logits(arch, router):
    model = tiny_model(arch)
    with torch.no_grad():
        dense = model(ids()).logits
    report = moefy(model, {"num_experts": 4, "top_k": 4, "router": router, **FAST}, calib())
    assert len(report.layers) == 2
    assert sum(isinstance(m, MoEMLP) for m in model.modules()) == 2
    with torch.no_grad():
        moe = model(ids()).logits
        assert (moe - dense).abs().max() < 1e-5
        set_top_k(model, 2)  # half the experts: a real approximation, not the dense model
        assert (model(ids()).logits - dense).abs().max() > 1e-3


def test_partition_covers_every_neuron_once_with_balanced_sizes():
    model = tiny_model("llama", intermediate_size=130)  # 130 = 33 + 33 + 32 + 32
    before = [layer.mlp.gate_proj.weight.detach().clone() for layer in model.model.layers]
    up_before = [layer.mlp.up_proj.weight.detach().clone() for layer in model.model.layers]
    moefy(model, {"num_experts": 4, "top_k": 2}, calib())
    for layer, gate, up in zip(model.model.layers, before, up_before):
        moe = layer.mlp
        assert moe.widths() == [33, 33, 32, 32] and moe.bounds[-1] == 130
        # the new rows are the old rows reordered: every neuron appears exactly once
        match = torch.cdist(moe.gate_proj.weight.detach(), gate).argmin(dim=1)
        assert sorted(match.tolist()) == list(range(130))
        assert torch.equal(moe.gate_proj.weight.detach(), gate[match])
        assert torch.equal(moe.up_proj.weight.detach(), up[match])


def test_balanced_kmeans_sizes_and_separation():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 4
    points = torch.cat([c + 0.1 * torch.randn(20, 16, generator=g) for c in centers])  # 5 clean groups of 20
    labels = balanced_kmeans(points, 5, seed=0)
    assert sorted(torch.bincount(labels, minlength=5).tolist()) == [20] * 5
    for i in range(5):  # each true group lands in one cluster
        assert labels[i * 20:(i + 1) * 20].unique().numel() == 1
    assert balanced_sizes(10, 4) == [3, 3, 2, 2]
    uneven = balanced_kmeans(torch.randn(103, 8, generator=g), 8)
    assert sorted(torch.bincount(uneven).tolist()) == sorted(balanced_sizes(103, 8))


@pytest.mark.parametrize("router", ["centroid", "trained"])
def test_router_beats_chance_on_calibration_data(router):
    model = tiny_model("llama")
    report = moefy(model, {"num_experts": 4, "top_k": 2, "router": router, **FAST}, calib(16))
    recall = sum(r["recall"] for r in report.layers) / len(report.layers)
    mass = sum(r["mass_kept"] for r in report.layers) / len(report.layers)
    assert all(r["chance_recall"] == 0.5 for r in report.layers)
    # chance: 0.5 recall; the trained router nearly matches the oracle
    assert recall > (0.75 if router == "trained" else 0.52), report.layers
    assert mass > 0.5


def test_moefied_model_generates():
    """generate() (KV cache, one new token per step through the routed FFNs) continues exactly as a
    greedy decode that re-runs the whole sequence every step, and top-1 routing changes the text."""
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    moefy(model, {"num_experts": 4, "top_k": 1}, calib())
    prompt = ids()[:1, :8]
    out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)

    def greedy(m: torch.nn.Module) -> torch.Tensor:
        seq = prompt
        with torch.no_grad():
            for _ in range(6):
                logits = m(seq).logits[:, -1]
                logits[:, m.config.eos_token_id] = -float("inf")  # as min_new_tokens does
                seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        return seq

    expected = greedy(model)
    assert torch.equal(out, expected)
    assert not torch.equal(expected, greedy(dense))  # one expert of four: not the dense model's text


def test_save_reload_dense_and_moe(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    original = copy.deepcopy(model)
    moefy(model, {"num_experts": 4, "top_k": 2, "router": "trained", **FAST}, calib())
    folder = save_moefied(model, byte_tokenizer(), tmp_path / "moe")
    spec = json.loads((folder / "moefication.json").read_text())
    assert spec["ffns"]["model.layers.0.mlp"]["bounds"] == [0, 32, 64, 96, 128]
    with torch.no_grad():
        # plain transformers: the dense model (neurons reordered: same function)
        plain = AutoModelForCausalLM.from_pretrained(folder)
        assert (plain(ids()).logits - original(ids()).logits).abs().max() < 1e-5
        # qingzhou: the MoE model, same outputs as in memory
        again, _ = load_moefied(folder, dtype="float32", device="cpu")
        assert (again(ids()).logits - model(ids()).logits).abs().max() < 1e-6
        assert isinstance(model.model.layers[0].mlp, MoEMLP)  # saving swapped the dense FFNs back
        apply_moefication(plain, folder, top_k=4)
        assert (plain(ids()).logits - original(ids()).logits).abs().max() < 1e-5


def test_apply_refuses_a_mismatched_model(tmp_path):
    model = tiny_model("llama")
    moefy(model, {"num_experts": 4, "top_k": 2}, calib())
    folder = save_moefied(model, None, tmp_path / "moe")
    with pytest.raises(ModelLoadError, match="does not match"):
        apply_moefication(tiny_model("llama", intermediate_size=96), folder)


def test_quality_table_dense_row_equals_dense_perplexity(tmp_path):
    from qingzhou.eval.perplexity import perplexity

    path = write_text(tmp_path)
    tok = byte_tokenizer()
    model = tiny_model("llama")
    dense = perplexity(model, tok, TEXT, seq_len=64, max_windows=4, progress=False).ppl
    report = moefy(model, {"num_experts": 4, "top_k": 2, "evaluate": {"text": path, "seq_len": 64,
                                                                      "max_windows": 4}}, calib(), tokenizer=tok)
    assert [r["top_k"] for r in report.quality] == [4, 2, 1]
    assert [r["ffn_compute_kept"] for r in report.quality] == [1.0, 0.5, 0.25]
    assert report.quality[0]["ppl"] == pytest.approx(dense, rel=1e-4)
    assert model.model.layers[0].mlp.top_k == 2  # restored after the sweep
    assert report.summary()["ppl_top1"] == report.quality[2]["ppl"]


def test_config_and_layout_errors():
    with pytest.raises(pydantic.ValidationError, match="more than num_experts"):
        MoefyConfig(num_experts=4, top_k=5)
    assert MoefyConfig(num_experts=16).sweep() == [16, 8, 4]
    with pytest.raises(ModelLoadError, match="cannot moefy"):
        moefy(tiny_model("gpt2"), {"num_experts": 4}, calib())  # GPT-2's Conv1D projections


def test_skip_leaves_ffn_dense():
    model = tiny_model("llama")
    report = moefy(model, {"num_experts": 4, "top_k": 2, "skip": [r"layers\.0\.mlp"]}, calib())
    assert report.skipped == ["model.layers.0.mlp"]
    assert not isinstance(model.model.layers[0].mlp, MoEMLP) and isinstance(model.model.layers[1].mlp, MoEMLP)


def test_recipe_moefy_stage_saves_and_reports(tmp_path, tiny_llama_dir):
    text_file = write_text(tmp_path)
    from qingzhou.compress.moefy import MoEMLP, load_moefied
    from qingzhou.recipes.runner import run_recipe

    stages = [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"},
        {"kind": "moefy", "num_experts": 4, "top_k": 2, "router": "trained", "router_steps": 50,
         "calibration": {"source": text_file, "seq_len": 32, "num_samples": 6},
         "evaluate": {"text": text_file, "seq_len": 64, "max_windows": 2}},
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "m", "seed": 0, "stages": stages}, sort_keys=False))
    result = run_recipe(str(recipe), tmp_path / "run", progress=False)
    assert result.status == "complete"
    metrics = json.loads((tmp_path / "run" / "02-moefy" / "metrics.json").read_text())
    assert metrics["moefied_ffns"] == 2 and metrics["top_k"] == 2 and set(metrics) >= {"ppl_top4", "ppl_top2", "ppl_top1"}
    model, _ = load_moefied(tmp_path / "run" / "02-moefy" / "model", dtype="float32", device="cpu")
    assert isinstance(model.model.layers[1].mlp, MoEMLP) and model.model.layers[1].mlp.top_k == 2


def test_bad_moefy_stage_fails_validation(tmp_path, tiny_llama_dir):
    from qingzhou.errors import RecipeError
    from qingzhou.recipes.runner import run_recipe

    stages = [{"kind": "load", "model": str(tiny_llama_dir)}, {"kind": "moefy", "num_experts": 4, "top_k": 8}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "m", "stages": stages}))
    with pytest.raises(RecipeError, match="top_k=8 is more than num_experts=4"):
        run_recipe(str(recipe), tmp_path / "run", progress=False)


def test_cli_moefy(tmp_path, tiny_llama_dir):
    text_file = write_text(tmp_path)
    from qingzhou.cli.main import app

    out = tmp_path / "moe"
    res = CliRunner().invoke(app, ["moefy", str(tiny_llama_dir), str(out), "--experts", "4", "--top-k", "1",
                                   "--calibration", text_file, "--num-samples", "4", "--seq-len", "32",
                                   "--eval-text", text_file, "--eval-windows", "2", "--eval-seq-len", "64", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["num_experts"] == 4 and [q["top_k"] for q in data["quality"]] == [4, 2, 1]
    assert (out / "moefication.json").is_file() and (out / "model.safetensors").is_file()
    bad = CliRunner().invoke(app, ["moefy", str(tiny_llama_dir), str(tmp_path / "x"), "--experts", "4", "--top-k", "9"])
    assert bad.exit_code == 2, bad.output  # a user error: one paragraph, no traceback, nothing written
    assert "moefy: top_k=9 is more than num_experts=4" in " ".join(bad.output.split())
    assert "Traceback" not in bad.output and isinstance(bad.exception, SystemExit)
    assert not (tmp_path / "x").exists()
