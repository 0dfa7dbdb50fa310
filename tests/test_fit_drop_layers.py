"""Issue 21, `fit(..., drop_layers=N)`: whole decoder layers as one more option of the search.

A layer whose output equals its input measures no loss when dropped; a budget that no plan of the
full model meets is met by dropping a layer, with the written file's bytes equal to the prediction
and the saved model one layer shorter; the plan recipe (structured prune, then quantize) reproduces
the weights bit for bit; and with room to spare the plan that drops nothing is a KL-checked candidate."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from qingzhou.errors import RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=6, length=32, seed=1):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 272, (length,), generator=gen) for _ in range(n)]


def _model(layers=4):
    from qingzhou.finetune.testing import tiny_model

    return tiny_model("llama", num_hidden_layers=layers)


def _smallest(model, **kw) -> int:
    from qingzhou.compress.fit import fit

    with pytest.raises(RecipeError, match=r"smallest reachable size is (\d+) bytes") as info:
        fit(model, 1000, {"method": "rtn"}, _calib(), apply=False, **kw)
    return int(re.search(r"smallest reachable size is (\d+) bytes", str(info.value)).group(1))


def test_a_layer_that_changes_nothing_loses_nothing_when_dropped():
    import torch

    from qingzhou.compress.fit.layer_drop import angular_distances, drop_losses, layer_groups

    model = _model()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: an identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    groups = layer_groups(model, names)
    assert [g.index for g in groups] == [0, 1, 2, 3] and all(len(g.linears) == 7 for g in groups)
    assert all(g.own_bytes == 2 * 2 * 64 for g in groups)  # two RMSNorm weights of 64, stored in 16 bits
    lost = drop_losses(model, _calib(2), groups)
    assert lost[2] == pytest.approx(0.0, abs=1e-7)  # the chunked-head KL of equal logits: ~1e-9, rounding
    assert all(lost[i] > 1e-4 for i in (0, 1, 3))
    turn = angular_distances(model, _calib(2))  # the cheap ranking fit measures drops in
    assert turn[2] == pytest.approx(0.0, abs=1e-3) and all(turn[i] > 1e-2 for i in (0, 1, 3))


def test_a_budget_only_dropping_meets_is_met_and_the_plan_reproduces_it(tmp_path):
    import torch
    from safetensors.torch import load_file

    from qingzhou.finetune.testing import byte_tokenizer
    from qingzhou.llm import load_model, save_model
    from qingzhou.recipes.runner import run_recipe

    src = tmp_path / "tiny4"
    save_model(_model(), byte_tokenizer(), src)

    model, _ = load_model(str(src), dtype="float32", device="cpu")
    full = _smallest(model)  # every linear at its cheapest option, all layers kept
    with_drop = _smallest(model, drop_layers=1)
    assert with_drop < full
    budget = full - 1
    calib = {"num_samples": 6, "seq_len": 32}
    recipe = tmp_path / "fit.yaml"
    recipe.write_text(yaml.safe_dump({"name": "f", "stages": [
        {"kind": "load", "model": str(src), "device": "cpu", "dtype": "float32"},
        {"kind": "fit", "method": "gptq", "max_size": budget, "drop_layers": 1, "neighbours": [],
         "calibration": calib, "batch_size": 2},
    ]}, sort_keys=False))
    run_recipe(str(recipe), tmp_path / "run", progress=False)
    fitted = tmp_path / "run" / "02-fit" / "model"
    report = json.loads((fitted.parent / "fit_report.json").read_text())
    assert len(report["dropped_layers"]) == 1
    gone = report["dropped_layers"][0]
    assert json.loads((fitted / "config.json").read_text())["num_hidden_layers"] == 3
    size = (fitted / "model.safetensors").stat().st_size
    assert size <= budget
    tensors = load_file(str(fitted / "model.safetensors"))
    assert not any(k.startswith("model.layers.3.") for k in tensors)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload == report["predicted_bytes"]
    # the plan: prune exactly that layer, then quantize with the renumbered names
    stages = yaml.safe_load((fitted / "plan.yaml").read_text())["stages"]
    assert [s["kind"] for s in stages] == ["load", "prune", "quantize"]
    assert stages[1]["method"] == "structured" and stages[1]["drop_layers"] == [gone]
    assert not any(f"layers.{3}." in o["pattern"] for o in stages[2]["overrides"])
    run_recipe(str(fitted / "plan.yaml"), tmp_path / "again", progress=False)
    again = load_file(str(tmp_path / "again" / "03-quantize" / "model" / "model.safetensors"))
    assert set(again) == set(tensors)
    for k, t in tensors.items():
        assert t.dtype == again[k].dtype and torch.equal(t, again[k]), k
    # the fitted model still runs
    fitted_model, _ = load_model(str(fitted), dtype="float32", device="cpu")
    assert torch.isfinite(fitted_model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits).all()


def test_with_room_the_plan_without_drops_is_checked_too():
    from qingzhou.compress.fit import fit
    from qingzhou.compress.fit.budget import Budget

    report = fit(_model(), Budget(avg_bits=3.3), {"method": "rtn"}, _calib(), apply=False, neighbours=(),
                 drop_layers=1)
    names = {c["name"]: c for c in report.candidates}
    assert "x1 no drop" in names and names["x1 no drop"]["dropped_layers"] == []
    assert names["x1 no drop"]["kl"] is not None
    assert report.kl == min(c["kl"] for c in report.candidates if c["eligible"])
    assert report.avg_bits <= 3.3
    with pytest.raises(RecipeError, match="drop_layers"):
        fit(_model(), Budget(avg_bits=3.3), {"method": "rtn"}, _calib(), apply=False, drop_layers=4)
    with pytest.raises(RecipeError, match="drop_layers"):
        fit(_model(), Budget(avg_bits=3.3), {"method": "rtn"}, _calib(), apply=False, drop_layers=1,
            weighting="none")


def test_gguf_of_a_plan_that_drops_a_layer_has_the_kept_layers_only(tmp_path):
    import gguf

    from qingzhou.compress.fit import fit
    from qingzhou.compress.fit.budget import Budget
    from qingzhou.finetune.testing import byte_tokenizer

    with pytest.raises(RecipeError, match=r"lowest reachable average is ([\d.]+) bits") as info:
        fit(_model(), Budget(avg_bits=1.0), {"method": "rtn"}, _calib(), apply=False)
    lowest = float(re.search(r"lowest reachable average is ([\d.]+) bits", str(info.value)).group(1))
    report = fit(_model(), Budget(avg_bits=lowest - 0.01), {"method": "rtn"}, _calib(), tokenizer=byte_tokenizer(),
                 output_dir=tmp_path / "out", heldout=0, drop_layers=2, gguf=True)
    assert len(report.dropped_layers) in (1, 2) and report.avg_bits <= lowest - 0.01
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model.gguf"))
    blocks = reader.fields["llama.block_count"]
    kept = 4 - len(report.dropped_layers)
    assert int(blocks.parts[blocks.data[0]][0]) == kept
    layers = {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")}
    assert layers == set(range(kept))
