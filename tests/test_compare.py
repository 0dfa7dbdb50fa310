"""`qingzhou compare`: rows, deltas against the baseline and plots from run.json files (hand-written
numbers), the CLI, and one real tiny recipe run whose report carries the comparison and its plot."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from qingzhou.cli.main import app
from qingzhou.errors import DataError
from qingzhou.eval.compare import compare

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(folder, name, env, stages, configs):
    folder.mkdir(parents=True)
    record = {"name": name, "status": "complete", "environment": env, "config": {"name": name, "stages": configs},
              "stages": stages}
    (folder / "run.json").write_text(json.dumps(record))
    return folder


def _eval(index, label, source, memory, disk, ppl, piqa):
    return {"index": index, "kind": "eval", "label": label, "model_out": {"source": source},
            "metrics": {"size": {"memory_mb": memory, "disk_mb": disk},
                        "perplexity": {"data": "builtin:corpus", "ppl": ppl},
                        "tasks": {"piqa": {"metric": "acc", "score": piqa, "stderr": 0.01, "n": 200}}}}


def _bench(index, source, tok_s, peak):
    return {"index": index, "kind": "bench", "label": f"{index:02d}-bench", "model_out": {"source": source},
            "metrics": {"decode_tokens_per_s": tok_s, "peak_memory_gib": peak}}


@pytest.fixture
def runs(tmp_path):
    cpu = {"device": "cpu", "device_name": "AMD EPYC"}
    base = _run(tmp_path / "base", "base-run", cpu,
                [{"index": 1, "kind": "load", "label": "01-load", "model_out": {"source": "smollm2"}, "metrics": {}},
                 _eval(2, "base", "smollm2", 500.0, 100.0, 20.0, 0.70), _bench(3, "smollm2", 50.0, 1.5)],
                [{"kind": "load"}, {"kind": "eval"}, {"kind": "bench"}])
    qsrc = "/elsewhere/runs/q/02-quantize/model"
    quant = _run(tmp_path / "quant", "gptq-run", {"device": "cuda", "device_name": "NVIDIA H100"},
                 [{"index": 1, "kind": "load", "label": "01-load", "model_out": {"source": "smollm2"}, "metrics": {}},
                  {"index": 2, "kind": "quantize", "label": "02-quantize", "model_out": {"source": qsrc}, "metrics": {}},
                  _eval(3, "gptq", qsrc, 150.0, 160.0, 22.5, 0.655), _bench(4, qsrc, 80.0, 0.9)],
                 [{"kind": "load"}, {"kind": "quantize", "method": "gptq", "bits": 4, "group_size": 64},
                  {"kind": "eval"}, {"kind": "bench"}])
    return base, quant


def test_rows_and_deltas_against_the_first_run(runs):
    c = compare(list(runs))
    assert [r["stage"] for r in c.rows] == ["base", "gptq"]
    base, gptq = c.rows
    assert base["method"] == "base" and gptq["method"] == "quantize:gptq-4b-g64"
    assert gptq["model"] == "02-quantize/model" and gptq["device"] == "cuda (NVIDIA H100)"
    assert gptq["piqa/acc"] == 65.5 and gptq["decode_tok_s"] == 80.0 and gptq["speed_source"] == "bench"
    assert c.deltas(gptq) == pytest.approx({"memory_mb": -350.0, "disk_mb": 60.0, "ppl": 2.5, "piqa/acc": -4.5,
                                            "decode_tok_s": 30.0, "peak_mem_gib": -0.6})
    assert c.deltas(base) == {k: 0 for k in c.deltas(gptq)}
    shown = c.display_rows()[1]
    assert shown["ppl"] == "22.50 (+2.50)" and shown["piqa/acc"] == "65.50 (-4.50)"
    assert shown["memory_mb"] == "150.00 (-350.00)" and c.display_rows()[0]["ppl"] == "20.00"
    assert c.quality == ["ppl", "piqa/acc"]


def test_out_writes_markdown_json_and_plots(runs, tmp_path):
    out = tmp_path / "cmp"
    c = compare(list(runs), out=out)
    md = (out / "compare.md").read_text()
    assert "22.50 (+2.50)" in md and "![quality_vs_size](plots/quality_vs_size.png)" in md
    for name in ("quality_vs_size", "quality_vs_speed"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == PNG
    data = json.loads((out / "compare.json").read_text())
    assert data["rows"][1]["delta"]["ppl"] == 2.5 and c.files["json"].endswith("compare.json")


def test_cli_prints_the_table_and_json(runs, tmp_path):
    res = CliRunner().invoke(app, ["compare", *map(str, runs), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["rows"][1]["delta"]["piqa/acc"] == -4.5
    res = CliRunner().invoke(app, ["compare", *map(str, runs), "--out", str(tmp_path / "o")], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "quantize:gptq-4b-g64" in res.output and "(+2.50)" in res.output
    assert (tmp_path / "o" / "plots" / "quality_vs_size.png").exists()


def test_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no run.json"):
        compare([tmp_path])
    res = CliRunner().invoke(app, ["compare", str(tmp_path)])
    assert res.exit_code == 2 and "no run.json" in res.output


def test_real_tiny_run_report_has_the_comparison_and_plot(tmp_path, tiny_llama_dir):
    from qingzhou.recipes.runner import run_recipe

    text = tmp_path / "text.txt"
    text.write_text("The grid operator balances supply and demand every second of the day. " * 8)
    ppl = {"data": str(text), "seq_len": 32}
    stages = [{"kind": "load", "model": str(tiny_llama_dir), "device": "cpu"},
              {"kind": "eval", "name": "base", "perplexity": ppl},
              {"kind": "quantize", "method": "rtn", "bits": 4, "group_size": 32},
              {"kind": "eval", "name": "rtn4", "perplexity": ppl},
              {"kind": "bench", "prompt_tokens": 4, "new_tokens": 3, "warmup": 0, "repeats": 1,
               "measure_bandwidth": False},
              {"kind": "bench", "name": "bf16", "prompt_tokens": 4, "new_tokens": 3, "warmup": 0, "repeats": 1,
               "measure_bandwidth": False, "dtype": "bfloat16"},
              {"kind": "eval", "name": "after-bf16-bench", "perplexity": ppl},
              {"kind": "report"}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "tiny", "stages": stages}))
    run = run_recipe(str(recipe), tmp_path / "run", progress=False).run_dir
    bf16 = json.loads((run / "06-bench" / "bench.json").read_text())
    assert bf16["config"]["dtype"] == "torch.bfloat16"
    c = compare([run])
    base, rtn, after = c.rows  # the bf16 bench cast a copy: the run's model still gives rtn4's perplexity
    assert after["ppl"] == pytest.approx(rtn["ppl"], rel=1e-6)
    assert rtn["method"] == "quantize:rtn-4b-g32" and rtn["memory_mb"] < base["memory_mb"]
    assert rtn["decode_tok_s"] > 0 and rtn["speed_source"] == "bench" and base["decode_tok_s"] is None
    assert c.deltas(rtn)["ppl"] == pytest.approx(rtn["ppl"] - base["ppl"], abs=1e-3)
    md = (run / "report.md").read_text()
    assert "## Comparison with the first evaluation" in md and "quantize:rtn-4b-g32" in md
    assert "![quality_vs_size](08-report/plots/quality_vs_size.png)" in md
    assert (run / "08-report" / "plots" / "quality_vs_size.png").read_bytes()[:8] == PNG
    assert "![quality_vs_size](plots/quality_vs_size.png)" in (run / "08-report" / "report.md").read_text()
