"""Every shipped recipe (qingzhou/recipes/builtin/*.yaml, listed at collection time, so a new recipe
is covered without touching this file) runs end to end on a tiny random model, and every stage
leaves its artifact and metrics.

Only sizes are overridden, the way a user would with `qingzhou run NAME -s key=value`: the model
(a saved 2-layer, 64-wide Llama with a byte tokenizer), the device (cpu), steps, calibration
samples, sequence lengths, eval windows and task rows, decode lengths. Methods, data sources,
formats and stage order stay the recipe's own. A perplexity file given by a relative path (the
../shared/data layout) is used from the repository's parent when it is there; otherwise the stage
measures the built-in corpus instead, so the recipe still runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from qingzhou.recipes.schema import builtin_recipes

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
SEQ, WINDOWS, LIMIT, STEPS, NEW_TOKENS = 32, 2, 2, 2, 4


def tiny_overrides(raw: dict[str, Any], model_dir: Path) -> list[str]:
    """`-s key=value` overrides that shrink each stage of a raw recipe to seconds on a CPU."""
    out = []
    for i, stage in enumerate(raw["stages"]):
        kind, at = stage["kind"], f"stages.{i}"
        if kind == "load":
            out += [f"{at}.model={model_dir}", f"{at}.device=cpu", f"{at}.dtype=float32"]
        elif kind == "eval":
            ppl = stage.get("perplexity")
            if isinstance(ppl, dict):
                out += [f"{at}.perplexity.seq_len={SEQ}", f"{at}.perplexity.max_windows={WINDOWS}"]
                data = ppl.get("data", "builtin:corpus")
                if ":" not in data and not Path(data).is_absolute():  # a file relative to the repository
                    found = (REPO / data).resolve()
                    out.append(f"{at}.perplexity.data={found if found.is_file() else 'builtin:corpus'}")
            elif ppl is None and "perplexity" not in stage:  # the default perplexity spec: 2048-token windows
                out.append(f"{at}.perplexity={{seq_len: {SEQ}, max_windows: {WINDOWS}}}")
            if stage.get("tasks"):
                out.append(f"{at}.limit={LIMIT}")
        elif kind == "bench":
            out += [f"{at}.prompt_tokens=8", f"{at}.new_tokens={NEW_TOKENS}", f"{at}.repeats=1", f"{at}.warmup=0"]
        elif kind in ("prune", "quantize", "moefy") and "calibration" in stage:
            out += [f"{at}.calibration.num_samples=4", f"{at}.calibration.seq_len={SEQ}"]
        elif kind in ("finetune", "distill"):
            out += [f"{at}.max_steps={STEPS}", f"{at}.batch_size=2"]
            out += [f"{at}.grad_accum=1"] if "grad_accum" in stage else []
            out += [f"{at}.data.max_length=64"] if isinstance(stage.get("data"), dict) else []
            out += [f"{at}.max_new_tokens={NEW_TOKENS}"] if stage.get("show_prompts") else []
            out += [f"{at}.top_k=8", f"{at}.kl_rows=4"] if kind == "distill" else []
        elif kind == "generate":
            out.append(f"{at}.max_new_tokens={NEW_TOKENS}")
        elif kind == "preprocess":
            out.append(f"{at}.vocab_size=512")
        elif kind == "pretrain":
            out += [f"{at}.max_steps={STEPS}", f"{at}.batch_size=2", f"{at}.seq_len={SEQ}", f"{at}.eval_windows={WINDOWS}",
                    f"{at}.eval_every=1", f"{at}.save_every=0", f"{at}.architecture.hidden_size=32",
                    f"{at}.architecture.intermediate_size=64", f"{at}.architecture.num_hidden_layers=1"]
    return out


def needs_bitsandbytes(raw: dict[str, Any]) -> str | None:
    for i, stage in enumerate(raw["stages"]):
        if stage.get("method") in ("bnb", "qlora"):
            return f"stage {i} ({stage['kind']}, method {stage['method']})"
    return None


def check_stage(stage: dict[str, Any], spec: dict[str, Any], run_dir: Path, tiny_params: int) -> None:
    """The artifact and headline metrics each stage kind must leave behind."""
    kind, m, work = stage["kind"], stage["metrics"], run_dir / stage["dir"]
    where = f"{stage['label']} ({kind})"
    if kind == "load":
        assert m["parameters"] == tiny_params and m["device"] == "cpu", where
    elif kind == "eval":
        ppl = m["perplexity"]
        assert math.isfinite(ppl["ppl"]) and ppl["ppl"] > 1, where
        assert ppl["windows"] == WINDOWS and ppl["seq_len"] == SEQ and ppl["tokens"] == WINDOWS * (SEQ - 1), where
        for task in spec.get("tasks", []):
            assert m["tasks"][task]["n"] == LIMIT and 0 <= m["tasks"][task]["score"] <= 1, (where, task)
        if spec.get("tasks"):
            assert set(json.loads((work / "tasks.json").read_text())["results"]) == set(spec["tasks"]), where
    elif kind == "bench":
        assert m["decode_tokens_per_s"] > 0 and (work / "bench.json").is_file(), where
    elif kind == "prune":
        assert (work / "model" / "config.json").is_file() and (work / "model" / "model.safetensors").is_file()
        if spec.get("method") == "structured":
            saved = json.loads((work / "model" / "config.json").read_text())
            assert m["parameters_after"] < m["parameters_before"] == tiny_params, where
            assert saved["intermediate_size"] == m["intermediate_after"] < m["intermediate_before"], where
        else:
            assert m["pruned_linears"] == 14 and m["sparsity"] == pytest.approx(0.5), where
    elif kind == "quantize":
        if spec.get("save_format") == "gguf":
            assert (work / "model" / "model.gguf").stat().st_size > 0 and m["gguf_type"] == spec["gguf_type"], where
        elif spec.get("method") == "bnb":
            assert m["quant_type"] == spec["quant_type"] and (work / "model").is_dir(), where
        else:
            qc = json.loads((work / "model" / "config.json").read_text())["quantization_config"]
            assert qc["meta"]["method"] == spec["method"] and qc["bits"] == spec.get("bits", 4), where
            assert m["quantized_linears"] == 14 and m["linear_mb_after"] < m["linear_mb_before"], where
    elif kind in ("finetune", "distill"):
        assert m["steps"] == STEPS and math.isfinite(m["eval_loss_after"]), where
        weights = "adapter_model.safetensors" if m["artifact"] == "adapter" else "model.safetensors"
        assert (work / m["artifact"] / weights).is_file(), where
        if kind == "distill":
            assert math.isfinite(m["kl_before"]) and math.isfinite(m["kl_after"]), where
    elif kind == "export":
        assert m["merged"] is True and (work / "model" / "model.safetensors").is_file(), where
    elif kind == "generate":
        samples = json.loads((work / "samples.json").read_text())
        assert [s["prompt"] for s in samples] == spec["prompts"], where
    elif kind == "preprocess":
        assert m["train_tokens"] > 0 and m["val_documents"] >= 1 and (work / "data" / "index.json").is_file(), where
    elif kind == "pretrain":
        assert m["steps"] == STEPS and (work / "model" / "model.safetensors").is_file(), where
        assert len(m["val_perplexity"]) == STEPS + 1 and all(math.isfinite(p) for _, p in m["val_perplexity"]), where
    elif kind == "report":
        assert (work / "report.md").is_file() and all((run_dir / p).is_file() for p in m.get("plots", [])), where
    else:
        raise AssertionError(f"{where}: a shipped recipe uses stage kind {kind!r}; add its check to check_stage")


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipe_runs_end_to_end_on_a_tiny_model(name, tiny_llama_dir, tmp_path, monkeypatch):
    from qingzhou.finetune.testing import tiny_model
    from qingzhou.llm import devices
    from qingzhou.recipes.runner import run_recipe

    raw = yaml.safe_load(builtin_recipes()[name].read_text(encoding="utf-8"))
    bnb_stage = needs_bitsandbytes(raw)
    if bnb_stage and not devices.capabilities("cpu").bitsandbytes:
        pytest.skip(f"{bnb_stage} needs bitsandbytes >= 0.46 with its CPU backend, not installed here")
    monkeypatch.setenv("QINGZHOU_CACHE", str(tmp_path / "cache"))  # data and teacher caches stay in tmp
    result = run_recipe(name, tmp_path / "run", overrides=tiny_overrides(raw, tiny_llama_dir), progress=False)
    assert result.status == "complete"
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "complete" and record["name"] == raw["name"]
    assert [s["kind"] for s in record["stages"]] == [s["kind"] for s in raw["stages"]]
    tiny_params = sum(p.numel() for p in tiny_model("llama").parameters())
    for stage, spec in zip(record["stages"], raw["stages"]):
        assert stage["status"] == "complete", stage["label"]
        check_stage(stage, spec, tmp_path / "run", tiny_params)
