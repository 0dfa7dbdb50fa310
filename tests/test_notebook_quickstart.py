"""examples/quickstart_api.ipynb runs top to bottom on a tiny random model.

nbformat/nbclient are not dependencies, so the code cells are executed in order, in one namespace,
straight from the notebook JSON; the cell tagged `parameters` is replaced by the test's values."""
from __future__ import annotations

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart_api.ipynb"


def code_cells(path: Path) -> list[tuple[list[str], str]]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    return [(c.get("metadata", {}).get("tags", []), "".join(c["source"])) for c in nb["cells"]
            if c["cell_type"] == "code"]


def test_notebook_runs_on_a_tiny_model(tmp_path, tiny_llama_dir, monkeypatch):
    import torch

    torch.set_num_threads(1)  # tiny shapes: a second thread only adds contention
    cells = code_cells(NOTEBOOK)
    params = [src for tags, src in cells if "parameters" in tags]
    assert len(params) == 1 and 'MODEL = "smollm2"' in params[0]  # SmolLM2 by default
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__notebook__"}
    exec(compile(params[0], "parameters", "exec"), ns)  # the defaults, then the test's values
    ns.update(MODEL=str(tiny_llama_dir), DEVICE="cpu", SEQ_LEN=64, TASK_LIMIT=8, OUT=str(tmp_path / "nb"),
              QUANT={"method": "rtn", "bits": 4, "group_size": 32},
              BENCH={"prompt_tokens": 4, "new_tokens": 3, "repeats": 1, "warmup": 0, "measure_bandwidth": False})
    for i, (tags, src) in enumerate(cells):
        if "parameters" not in tags:
            exec(compile(src, f"cell {i}", "exec"), ns)
    assert ns["base_ppl"] > 1 and ns["base_task"]["n"] == 8
    comparison = ns["comparison"]
    assert [r["run"] for r in comparison.rows] == ["base", "rtn4"]
    base, quant = comparison.rows
    assert quant["method"] == "quantize:rtn-4b-g32" and quant["memory_mb"] < base["memory_mb"]
    # the recipe's numbers match the API's on the same model and settings
    assert base["ppl"] == round(ns["base_ppl"], 3) and quant["ppl"] == round(ns["q_ppl"], 3)
    assert quant["corpus_cloze/acc"] == round(100 * ns["q_task"]["score"], 2)
    assert Path(comparison.files["quality_vs_size"]).is_file()
    assert (tmp_path / "nb" / "compare" / "compare.md").is_file()
