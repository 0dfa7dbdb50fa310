"""Defaults that work on the default model: a group size that does not divide a layer's width falls
back (128 -> 64 -> 32 -> per channel) and is recorded; the CLI takes every default from the method
config; invalid settings fail before the model loads."""
from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from qingzhou.cli.main import app
from qingzhou.compress.quantize import load_quantized, quantize, save_quantized
from qingzhou.compress.quantize.config import FALLBACK_GROUP_SIZES
from qingzhou.compress.quantize.gptq import GPTQConfig
from qingzhou.compress.quantize.plan import fallback_group_size
from qingzhou.finetune.testing import byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[3, 17, 99, 250, 42, 7, 7, 130], [11, 12, 13, 14, 15, 16, 17, 18]])
# SmolLM2-135M in miniature: 192 = 1.5 x 128 (like 576 = 4.5 x 128); the MLP's 256 divides by 128
SHAPE = {"hidden_size": 192, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}
WIDE = (*(f"self_attn.{p}_proj" for p in "qkvo"), "mlp.gate_proj", "mlp.up_proj")  # input width 192


def test_fallback_rule_against_a_brute_force_search():
    assert GPTQConfig.model_fields["on_indivisible_group"].default == "fallback"
    assert fallback_group_size(576, 128) == 64  # SmolLM2-135M
    assert fallback_group_size(960, 128) == 64  # SmolLM2-360M
    assert fallback_group_size(96, 128) == 32 and fallback_group_size(48, 128) == -1
    assert fallback_group_size(64, 48) == 32  # never coarser than asked
    for width in range(8, 1100, 8):
        for asked in (256, 128, 100, 64, 48, 32, 16):
            allowed = [g for g in (256, 128, 96, 64, 48, 32, 16) if g in FALLBACK_GROUP_SIZES and g < asked]
            dividing = [g for g in allowed if width % g == 0]
            assert fallback_group_size(width, asked) == (max(dividing) if dividing else -1), (width, asked)


def test_default_settings_quantize_an_indivisible_model_record_the_fallback_and_reload(tmp_path):
    model = tiny_model("llama", **SHAPE)
    report = quantize(model, {"method": "rtn"})  # every other setting: the config's default
    assert report.config["group_size"] == 128 and report.config["on_indivisible_group"] == "fallback"
    fallen = report.group_size_fallbacks()
    assert fallen == {f"model.layers.{i}.{k}": 64 for i in range(2) for k in WIDE}
    assert report.summary()["group_size_fallbacks"] == 12
    for i in range(2):
        assert report.modules[f"model.layers.{i}.self_attn.q_proj"]["group_size_requested"] == 128
        down = report.modules[f"model.layers.{i}.mlp.down_proj"]
        assert down["group_size"] == 128 and "group_size_requested" not in down
        assert model.model.layers[i].self_attn.q_proj.scales.shape[0] == 192 // 64
        assert model.model.layers[i].mlp.down_proj.scales.shape[0] == 256 // 128
    with torch.no_grad():
        before = model(IDS).logits
    save_quantized(model, byte_tokenizer(), tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["group_size"] == 128
    assert {k: v["group_size"] for k, v in qc["dynamic"].items()} == {f"+:^{re.escape(n)}$": 64 for n in fallen}
    again = load_quantized(tmp_path / "q")
    assert again.model.layers[0].self_attn.q_proj.group_size == 64  # from the dynamic map
    assert again.model.layers[0].mlp.down_proj.group_size == 128
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, before, rtol=0, atol=1e-5)


def test_other_policies_still_hold():
    m = tiny_model("llama", **SHAPE)
    per_channel = quantize(m, {"method": "rtn", "on_indivisible_group": "per_channel"})
    assert set(per_channel.group_size_fallbacks().values()) == {-1} and len(per_channel.group_size_fallbacks()) == 12
    from qingzhou.errors import RecipeError

    with pytest.raises(RecipeError, match="group_size 128 does not divide the input width 192"):
        quantize(tiny_model("llama", **SHAPE), {"method": "rtn", "on_indivisible_group": "error"})


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    from qingzhou.llm import save_model

    folder = tmp_path_factory.mktemp("tiny192") / "model"
    save_model(tiny_model("llama", **SHAPE), byte_tokenizer(), folder)
    return folder


def test_cli_default_flags_quantize_an_indivisible_model(tmp_path, wide_dir):
    """`qingzhou quantize MODEL OUT` with no quantisation flags (calibration kept small for time)."""
    res = CliRunner().invoke(app, ["quantize", str(wide_dir), str(tmp_path / "q"), "--num-samples", "4",
                                   "--seq-len", "32", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    defaults = GPTQConfig.model_fields
    assert data["method"] == "gptq" and data["bits"] == defaults["bits"].default
    assert data["group_size"] == defaults["group_size"].default == 128 and data["sym"] is defaults["sym"].default
    assert data["group_size_fallbacks"] == 12
    assert data["group_size_fallback_modules"] == {f"model.layers.{i}.{k}": 64 for i in range(2) for k in WIDE}
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["method"] == "gptq" and len(qc["dynamic"]) == 12
    table = CliRunner().invoke(app, ["quantize", str(wide_dir), str(tmp_path / "t"), "--method", "rtn"])
    assert table.exit_code == 0, table.output
    assert "12 layers" in table.output and "use group size 64" in table.output


def stated_defaults(command: str) -> tuple[dict, dict]:
    """(click default, default named in the help text) of each option of a CLI command."""
    import typer.main

    params = typer.main.get_command(app).commands[command].params
    found = {p.name: re.search(r"\(default: ([^,;)]+)", p.help or "") for p in params}
    return {p.name: p.default for p in params}, {k: m.group(1) for k, m in found.items() if m}


def test_cli_defaults_are_the_configs():
    """Every quantize/prune setting flag defaults to None (the method config decides), and the
    defaults the help text names are the config's."""
    from qingzhou.compress.prune.wanda import WandaConfig
    from qingzhou.data.calibration import CalibrationConfig
    from qingzhou.recipes.stages.prune import PruneStage
    from qingzhou.recipes.stages.quantize import QuantizeStage

    calib = CalibrationConfig.model_fields
    calib_stated = {"calibration": calib["source"].default, "num_samples": str(calib["num_samples"].default),
                    "seq_len": str(calib["seq_len"].default)}
    defaults, stated = stated_defaults("quantize")
    assert defaults["method"] == QuantizeStage.default_method
    for name in ("bits", "group_size", "sym", "on_indivisible_group", "calibration", "num_samples", "seq_len",
                 "device"):
        assert defaults[name] is None, name
    fields = GPTQConfig.model_fields
    assert {k: stated[k] for k in ("bits", "group_size", "sym", "on_indivisible_group", *calib_stated)} == {
        "bits": str(fields["bits"].default), "group_size": str(fields["group_size"].default),
        "sym": str(fields["sym"].default).lower(), "on_indivisible_group": fields["on_indivisible_group"].default,
        **calib_stated}
    defaults, stated = stated_defaults("prune")
    assert defaults["method"] == PruneStage.default_method
    for name in ("sparsity", "nm", "heads", "mlp", "layers", "calibration", "num_samples", "seq_len"):
        assert defaults[name] is None, name
    assert {k: stated[k] for k in ("sparsity", *calib_stated)} == {
        "sparsity": str(WandaConfig.model_fields["sparsity"].default), **calib_stated}


@pytest.mark.parametrize(("argv", "message"), [
    (["--bits", "9"], "--bits: Input should be less than or equal to 8 (got 9)"),
    (["--on-indivisible-group", "round"], "--on-indivisible-group: Input should be 'fallback'"),
    (["--seq-len", "2"], "--seq-len: Input should be greater than or equal to 8"),
    (["--method", "smoothquant", "--bits", "4"], "--bits: Input should be greater than or equal to 8"),
    (["--method", "gptqq"], "unknown quantization method 'gptqq'. Did you mean 'gptq'?"),
    (["--calibration", "missing.txt"], "--calibration: calibration file 'missing.txt' does not exist"),
    (["--gguf-type", "q5_k"], "unknown GGUF type 'q5_k'"),
])
def test_cli_invalid_settings_fail_before_the_model_loads(tmp_path, argv, message):
    """The model argument does not exist: an error about it would mean it was loaded first."""
    res = CliRunner().invoke(app, ["quantize", str(tmp_path / "no-such-model"), str(tmp_path / "out"), *argv])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert "no-such-model" not in res.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--sparsity", "1.5"], "--sparsity: Input should be less than 1 (got 1.5)"),
    (["--heads", "0.5"], "--heads does not apply to --method wanda"),
    (["--method", "structured", "--nm", "2:4"], "--nm does not apply to --method structured"),
    (["--calibration", "missing.txt"], "--calibration: calibration file 'missing.txt' does not exist"),
])
def test_cli_prune_invalid_settings_fail_before_the_model_loads(tmp_path, argv, message):
    res = CliRunner().invoke(app, ["prune", str(tmp_path / "no-such-model"), str(tmp_path / "out"), *argv])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert "no-such-model" not in res.output and not (tmp_path / "out").exists()


def test_cli_prune_skip_adds_to_the_configs_default_skip_list(tmp_path, wide_dir):
    res = CliRunner().invoke(app, ["prune", str(wide_dir), str(tmp_path / "p"), "--method", "magnitude",
                                   "--skip", r"layers\.0\.", "--json", "--per-layer"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    from qingzhou.compress.prune.magnitude import MagnitudeConfig

    default_skip = MagnitudeConfig.model_fields["skip"].get_default(call_default_factory=True)
    assert data["config"]["skip"] == [*default_skip, r"layers\.0\."]
    assert data["config"]["sparsity"] == MagnitudeConfig.model_fields["sparsity"].default
    assert sorted(data["modules"]) == sorted(f"model.layers.1.{k}" for k in (*WIDE, "mlp.down_proj"))
    assert len(data["skipped"]) == 7 and all(".layers.0." in name for name in data["skipped"])
