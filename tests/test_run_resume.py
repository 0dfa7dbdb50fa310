"""Resume you can trust: run-relative paths, changed data / settings / code invalidate what they
must (with a reason), training checkpoints survive an interrupted stage, run names stay in runs/."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from qingzhou import signals
from qingzhou.recipes import runner
from qingzhou.recipes.runner import default_run_dir, run_recipe, stage_identity, why_rerun
from qingzhou.recipes.schema import validate_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS = [{"instruction": f"Meter reading {i}?", "output": f"[ok] {i * 11} kWh"} for i in range(12)]


@pytest.fixture
def files(tmp_path, tiny_llama_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    text = tmp_path / "text.txt"
    text.write_text("The grid operator balances supply and demand every second of the day. " * 6)
    stages = [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"},
        {"kind": "finetune", "method": "lora", "r": 4, "max_steps": 6, "batch_size": 4, "learning_rate": 1e-2,
         "save_every": 2, "progress": False, "data": {"source": str(data), "eval_fraction": 0.2, "cache": False}},
        {"kind": "eval", "perplexity": {"data": str(text), "seq_len": 32, "max_windows": 4}},
    ]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "resume", "seed": 1, "stages": stages}, sort_keys=False))
    return recipe, data, text


def _notes():
    heard = []
    return heard, heard.append


def test_resume_from_another_directory_uses_run_relative_paths(files, tmp_path, monkeypatch):
    recipe, _, _ = files
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = run_recipe(str(recipe), "runs/x", progress=False, log=lambda m: None)  # relative to a/
    run_dir = tmp_path / "a" / "runs" / "x"
    stage = json.loads((run_dir / "02-finetune" / "stage.json").read_text())
    assert stage["model_out"]["source"] == "02-finetune/adapter" and stage["model_out"]["in_run_dir"]
    assert json.loads((run_dir / "run.json").read_text())["stages"][1]["model_out"]["source"] == "02-finetune/adapter"
    assert not (run_dir / "checkpoints").exists()  # dropped once the stage completed

    monkeypatch.chdir(tmp_path / "b")  # the eval stage changes, so it reloads the adapter from disk
    again = run_recipe(str(recipe), run_dir, resume=True, overrides=["stages.2.perplexity.seq_len=16"], progress=False,
                       log=lambda m: None)
    assert [s["resumed"] for s in again.stages] == [True, True, False]
    assert again.stages[2]["metrics"]["perplexity"]["seq_len"] == 16
    assert first.stages[1]["metrics"]["eval_loss_after"] == again.stages[1]["metrics"]["eval_loss_after"]


def test_changed_data_or_code_reruns_the_stage_and_says_why(files, tmp_path, monkeypatch):
    recipe, data, _ = files
    out = tmp_path / "run"
    first = run_recipe(str(recipe), out, progress=False, log=lambda m: None)
    heard, log = _notes()
    same = run_recipe(str(recipe), out, resume=True, progress=False, log=log)
    assert [s["resumed"] for s in same.stages] == [True, True, True] and heard == []

    data.write_text(data.read_text() + json.dumps({"instruction": "new?", "output": "row"}) + "\n")
    heard, log = _notes()
    changed = run_recipe(str(recipe), out, resume=True, progress=False, log=log)
    assert [s["resumed"] for s in changed.stages] == [True, False, False]
    assert len(heard) == 1 and "02-finetune runs again because its data changed" in heard[0] and str(data) in heard[0]
    assert "the 1 stage(s) after it run again too" in heard[0]
    assert changed.stages[1]["metrics"]["data"]["rows"] == len(ROWS) + 1 != first.stages[1]["metrics"]["data"]["rows"]
    run = json.loads((out / "run.json").read_text())
    assert run["notes"] == heard and run["input_hashes"][str(data)] == runner.fingerprint_path(data)

    monkeypatch.setattr(runner, "code_version", lambda: "9.9.9+other")
    heard, log = _notes()
    newer = run_recipe(str(recipe), out, resume=True, progress=False, log=log)
    assert [s["resumed"] for s in newer.stages] == [False, False, False]
    assert "01-load runs again because qingzhou's code changed" in heard[0] and "-> 9.9.9+other" in heard[0]


def test_a_stage_built_on_an_older_predecessor_is_not_trusted():
    """Each stage records a token chained from the stage before it, so a stage folder left from an
    earlier version of the chain never passes for the current one."""
    recipe = validate_recipe({"stages": [{"kind": "load", "model": "x"}, {"kind": "eval"}]})
    other = validate_recipe({"stages": [{"kind": "load", "model": "y"}, {"kind": "eval"}]})
    load, evaluate = recipe.stages
    first = stage_identity(load, "", "v1")
    second = stage_identity(evaluate, first["token"], "v1")
    assert why_rerun(second, stage_identity(evaluate, first["token"], "v1")) is None
    moved = stage_identity(evaluate, stage_identity(other.stages[0], "", "v1")["token"], "v1")
    assert why_rerun(second, moved) == "the stage before it has changed since it ran"
    assert why_rerun(first, stage_identity(other.stages[0], "", "v1")) == "its settings changed"
    # how often a stage checkpoints does not change what it makes
    ft = validate_recipe({"stages": [{"kind": "load"}, {"kind": "finetune", "max_steps": 5}]}).stages[1]
    ft_often = validate_recipe({"stages": [{"kind": "load"}, {"kind": "finetune", "max_steps": 5, "save_every": 1,
                                                                "save_every_minutes": 1, "progress": False}]}).stages[1]
    assert runner.config_hash(ft) == runner.config_hash(ft_often)


def test_interrupted_finetune_continues_from_its_checkpoint_to_the_same_weights(files, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a recipe's fine-tune (here: delivered after step 3 by the fault
    hook): the stage's checkpoints survive beside its deleted temp folder, and --resume continues
    from the newest to bit-identical weights; changed settings discard them with a message."""
    from safetensors.torch import load_file

    recipe, _, _ = files
    straight = run_recipe(str(recipe), tmp_path / "straight", progress=False, log=lambda m: None)
    out = tmp_path / "run"
    monkeypatch.setattr(signals, "_fault_count", 0)
    monkeypatch.setenv("QINGZHOU_FAULT_LOG", str(tmp_path / "points.txt"))
    run_recipe(str(recipe), tmp_path / "count", progress=False, log=lambda m: None)
    labels = [line.split(" ", 1)[1] for line in (tmp_path / "points.txt").read_text().splitlines()]
    monkeypatch.setattr(signals, "_fault_count", 0)
    monkeypatch.setenv("QINGZHOU_FAULT_INJECT", f"{labels.index('step 3') + 1}:SIGINT")
    with pytest.raises(signals.Interrupted) as stopped:
        run_recipe(str(recipe), out, progress=False, log=lambda m: None)
    monkeypatch.delenv("QINGZHOU_FAULT_INJECT")
    assert stopped.value.exit_code == 130
    assert "stopped during 02-finetune; completed stages and the checkpoints of 02-finetune are kept" in str(stopped.value.message)
    assert f"--out {out} --resume" in stopped.value.message
    assert not (out / "02-finetune").exists() and not list(out.glob(".*.tmp"))
    ckpts = out / "checkpoints" / "02-finetune"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000002", "step-0000003"]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"

    heard, log = _notes()
    resumed = run_recipe(str(recipe), out, resume=True, progress=False, log=log)
    assert resumed.stages[1]["metrics"]["resumed_from"] == 3
    assert "02-finetune continues from its checkpoint step-0000003." in heard
    name = "02-finetune/adapter/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(out / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.stages[2]["metrics"]["perplexity"]["ppl"] == straight.stages[2]["metrics"]["perplexity"]["ppl"]

    # checkpoints made with other settings are discarded, not trusted
    monkeypatch.setattr(signals, "_fault_count", 0)
    monkeypatch.setenv("QINGZHOU_FAULT_INJECT", f"{labels.index('step 3') + 1}:SIGINT")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(str(recipe), tmp_path / "other", progress=False, log=lambda m: None)
    monkeypatch.delenv("QINGZHOU_FAULT_INJECT")
    heard, log = _notes()
    other = run_recipe(str(recipe), tmp_path / "other", resume=True, overrides=["stages.1.learning_rate=0.005"],
                       progress=False, log=log)
    assert any("discarding the checkpoints of 02-finetune: its settings changed" in h for h in heard)
    assert other.stages[1]["metrics"]["resumed_from"] is None


def test_ctrl_c_that_a_library_turns_into_another_error_still_ends_as_interrupted(files, tmp_path, monkeypatch):
    """Seen in CI: a run sent SIGINT 0.5 s in failed with transformers' lazy-import
    `ModuleNotFoundError` (its `__getattr__` turns a failed import into one). Here a stage turns
    its KeyboardInterrupt into that error the same way; the run knows a signal arrived, so it still
    ends as interrupted (exit code 130, run.json "interrupted", the resume command)."""
    import os
    import signal

    from qingzhou.recipes.registry import STAGES
    from qingzhou.registry import Entry

    recipe, _, _ = files
    straight = run_recipe(str(recipe), tmp_path / "straight", progress=False, log=lambda m: None)
    real = STAGES.get("eval")

    def eval_whose_import_is_interrupted(cfg, ctx):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, handled at the next bytecode
            for _ in range(1000):
                pass
        except KeyboardInterrupt as e:  # what transformers' lazy module does with a failed import
            raise ModuleNotFoundError("Could not import module 'LlamaForCausalLM'.") from e
        raise AssertionError("the signal did not arrive")

    monkeypatch.setitem(STAGES._entries, "eval", Entry("eval", eval_whose_import_is_interrupted, real.config,
                                                       real.meta, real.doc))
    out = tmp_path / "run"
    with pytest.raises(signals.Interrupted) as stopped:
        run_recipe(str(recipe), out, progress=False, log=lambda m: None)
    assert stopped.value.exit_code == 130
    assert isinstance(stopped.value.__cause__, ModuleNotFoundError)
    assert stopped.value.message.startswith("stopped during 03-eval; completed stages are kept.")
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["error"] == stopped.value.message
    assert not (out / "03-eval").exists() and not list(out.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone

    monkeypatch.setitem(STAGES._entries, "eval", real)
    resumed = run_recipe(str(recipe), out, resume=True, progress=False, log=lambda m: None)
    assert [s["resumed"] for s in resumed.stages] == [True, True, False]
    assert resumed.stages[2]["metrics"]["perplexity"]["ppl"] == straight.stages[2]["metrics"]["perplexity"]["ppl"]


def test_run_names_cannot_leave_runs(tmp_path, tiny_llama_dir, monkeypatch):
    recipe = validate_recipe({"name": "../../elsewhere", "stages": [
        {"kind": "load", "model": str(tiny_llama_dir), "device": "cpu"}]})
    path = default_run_dir(recipe)
    assert path.parent.as_posix() == "runs" and path.name.startswith("elsewhere-")
    for name in ("/etc/passwd", "..", "a/../../b", "~root", "名字 with spaces", ""):
        safe = runner.safe_run_name(name)
        assert safe and "/" not in safe and ".." not in safe and not safe.startswith(".")
    assert runner.safe_run_name("名字 with spaces") == "名字-with-spaces"
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    result = run_recipe(recipe, progress=False, log=lambda m: None)
    assert result.run_dir.parent == tmp_path / "work" / "runs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_interrupted_distill_stage_continues_from_its_checkpoint(tmp_path, tiny_llama_dir, monkeypatch):
    """The distill stage keeps its checkpoints beside its temp folder too (the teacher cache, a
    folder it writes, does not count as changed input on resume)."""
    from safetensors.torch import load_file

    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"Line {i}: the grid operator balances supply and demand." for i in range(40)))
    stages = [{"kind": "load", "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32"},
              {"kind": "distill", "teacher": "base", "method": "full", "learning_rate": 1e-3, "max_steps": 4,
               "batch_size": 4, "save_every": 2, "top_k": 16, "cache_dir": str(tmp_path / "tcache"), "progress": False,
               "data": {"source": str(text), "format": "text", "max_length": 48, "cache": False}}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "d", "seed": 2, "stages": stages}, sort_keys=False))
    run_recipe(str(recipe), tmp_path / "straight", progress=False, log=lambda m: None)  # also fills the teacher cache
    monkeypatch.setattr(signals, "_fault_count", 0)
    monkeypatch.setenv("QINGZHOU_FAULT_LOG", str(tmp_path / "points.txt"))  # count the points of a run on a warm cache
    run_recipe(str(recipe), tmp_path / "count", progress=False, log=lambda m: None)
    monkeypatch.delenv("QINGZHOU_FAULT_LOG")
    labels = [line.split(" ", 1)[1] for line in (tmp_path / "points.txt").read_text().splitlines()]
    monkeypatch.setattr(signals, "_fault_count", 0)
    monkeypatch.setenv("QINGZHOU_FAULT_INJECT", f"{labels.index('step 3') + 1}:SIGTERM")
    with pytest.raises(signals.Interrupted) as stopped:
        run_recipe(str(recipe), tmp_path / "run", progress=False, log=lambda m: None)
    monkeypatch.delenv("QINGZHOU_FAULT_INJECT")
    assert stopped.value.exit_code == 143
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "02-distill").glob("step-*")) == \
        ["step-0000002", "step-0000003"]
    resumed = run_recipe(str(recipe), tmp_path / "run", resume=True, progress=False, log=lambda m: None)
    assert [s["resumed"] for s in resumed.stages] == [True, False]
    assert json.loads((tmp_path / "run" / "02-distill" / "distill.json").read_text())["finetune"]["resumed_from"] == 3
    a = load_file(str(tmp_path / "straight" / "02-distill" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "02-distill" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = run_recipe(str(recipe), tmp_path / "run", resume=True, progress=False, log=lambda m: None)
    assert [s["resumed"] for s in again.stages] == [True, True]


def test_time_based_checkpoints_are_on_by_default(tmp_path):
    """Without `save_every`, training still checkpoints every `save_every_minutes` (10 by default),
    so Ctrl-C or a crash loses at most that much; here a tiny interval makes it every step."""
    from qingzhou.data import DataConfig, prepare_data
    from qingzhou.finetune import finetune, parse_finetune_config
    from qingzhou.finetune.testing import byte_tokenizer, tiny_model

    assert parse_finetune_config({"method": "lora"}).save_every_minutes == 10
    assert parse_finetune_config({"method": "lora"}).save_every == 0
    tok = byte_tokenizer()
    data = prepare_data(DataConfig(source="<records>", eval_fraction=0, cache=False), tok, records=ROWS)
    finetune(tiny_model("llama"), tok, data, {"method": "lora", "max_steps": 4, "batch_size": 4, "progress": False,
                                              "save_every_minutes": 1e-9}, output_dir=tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t" / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    finetune(tiny_model("llama"), tok, data, {"method": "lora", "max_steps": 4, "batch_size": 4, "progress": False},
             output_dir=tmp_path / "quick")  # a short run never reaches the 10 minutes
    assert not (tmp_path / "quick" / "checkpoints").exists()
