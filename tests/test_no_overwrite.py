"""Never delete what qingzhou did not write: every writer refuses a non-empty output folder unless
told to replace it, and even then replaces only a folder carrying qingzhou's marker; replacing is
atomic, also when interrupted halfway."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from qingzhou import signals
from qingzhou.cli.main import app
from qingzhou.finetune.testing import byte_tokenizer, tiny_model
from qingzhou.io import MARKER, OutputError, is_qingzhou_dir
from qingzhou.llm import save_model

runner = CliRunner()


@pytest.fixture
def user_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def _untouched(folder) -> bool:
    return sorted(p.name for p in folder.iterdir()) == ["thesis.tex"] and (folder / "thesis.tex").read_text() == "years of work"


def test_save_model_refuses_foreign_and_existing_folders(tmp_path, user_folder):
    model, tok = tiny_model("llama"), byte_tokenizer()
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not written by qingzhou" if overwrite else "not empty"):
            save_model(model, tok, user_folder, overwrite=overwrite)
        assert _untouched(user_folder)
    ours = save_model(model, tok, tmp_path / "ours")
    marker = json.loads((ours / MARKER).read_text())
    assert marker["written_by"] == "qingzhou" and marker["what"] == "model"
    with pytest.raises(OutputError, match="--force"):
        save_model(model, tok, ours)
    (ours / "note.txt").write_text("replaced with the folder")
    save_model(model, tok, ours, overwrite=True)
    assert not (ours / "note.txt").exists() and (ours / "model.safetensors").is_file() and is_qingzhou_dir(ours)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model(model, tok, empty)  # an empty folder holds nothing to lose
    with pytest.raises(OutputError, match="is a file"):
        save_model(model, tok, user_folder / "thesis.tex", overwrite=True)


def test_replacing_is_atomic_even_when_interrupted_between_the_renames(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), byte_tokenizer()
    ours = save_model(model, tok, tmp_path / "ours")
    before = {p.name: p.read_bytes() for p in ours.iterdir()}
    monkeypatch.setattr(signals, "_fault_count", 0)
    monkeypatch.setenv("QINGZHOU_FAULT_INJECT", "2:SIGINT")  # 1: before the commit, 2: old folder moved aside
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny_model("llama", seed=5), tok, ours, overwrite=True)
    assert {p.name: p.read_bytes() for p in ours.iterdir()} == before  # the old folder is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


def test_gguf_export_refuses_an_existing_file(tmp_path):
    from qingzhou.compress.quantize.formats.gguf import export_gguf

    target = tmp_path / "m.gguf"
    target.write_bytes(b"someone's file")
    with pytest.raises(OutputError, match="exists"):
        export_gguf(tiny_model("llama"), byte_tokenizer(), target, "f32")
    assert target.read_bytes() == b"someone's file"
    export_gguf(tiny_model("llama"), byte_tokenizer(), target, "f32", overwrite=True)
    assert target.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("command", [
    ["quantize", "no-such-model", "{out}", "--method", "rtn"],
    ["prune", "no-such-model", "{out}"],
    ["moefy", "no-such-model", "{out}"],
    ["export", "merge", "{adapter}", "{out}"],
])
def test_cli_writers_refuse_a_foreign_folder_before_loading_anything(command, tmp_path, user_folder):
    """The output check runs first: the model named here does not even exist, and the error is
    about the folder (exit 2, one paragraph), with and without --force."""
    args = [a.format(out=user_folder, adapter=tmp_path) for a in command]
    for extra in ([], ["--force"]):
        res = runner.invoke(app, args + extra)
        assert res.exit_code == 2, res.output
        assert "output error" in res.stderr and str(user_folder) in res.stderr and "Traceback" not in res.output
        assert ("not written by qingzhou" if extra else "not empty") in res.stderr
        assert _untouched(user_folder)


def test_cli_force_replaces_a_folder_qingzhou_wrote(tmp_path, tiny_llama_dir):
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama_dir), str(out), "--method", "rtn", "--group-size", "32", "--dense", "--json"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.stderr
    (out / "stale.txt").write_text("x")
    forced = runner.invoke(app, args + ["--force"])
    assert forced.exit_code == 0, forced.output
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_run_refuses_a_foreign_folder_and_force_restarts_its_own(tmp_path, tiny_llama_dir, user_folder):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "stages": [{"kind": "load", "model": str(tiny_llama_dir),
                                                                "device": "cpu"}]}))
    for extra in ([], ["--force"], ["--resume"]):
        res = runner.invoke(app, ["run", str(recipe), "--out", str(user_folder), *extra])
        assert res.exit_code == 2 and "holds no run" in res.stderr, res.output
        assert _untouched(user_folder)
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", str(recipe), "--out", str(out)]).exit_code == 0
    first = json.loads((out / "run.json").read_text())["started_at"]
    (out / "01-load" / "extra.txt").write_text("from the old run")
    res = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert not (out / "01-load" / "extra.txt").exists() and json.loads((out / "run.json").read_text())["started_at"] >= first
    assert (out / "01-load" / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "r.yaml", "run"]  # nothing left beside it


def test_finetune_output_folder_rules(tmp_path, user_folder):
    from qingzhou.data import DataConfig, prepare_data
    from qingzhou.finetune import finetune

    tok = byte_tokenizer()
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)]
    data = prepare_data(DataConfig(source="<records>", eval_fraction=0, cache=False), tok, records=rows)
    cfg = {"method": "lora", "max_steps": 2, "batch_size": 4, "progress": False}
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not written by qingzhou"):
            finetune(tiny_model("llama"), tok, data, cfg, output_dir=user_folder, overwrite=overwrite)
        assert _untouched(user_folder)
    out = tmp_path / "ft"
    finetune(tiny_model("llama"), tok, data, {**cfg, "save_every": 1}, output_dir=out)
    assert is_qingzhou_dir(out) and (out / "checkpoints" / "step-0000001" / MARKER).is_file()
    with pytest.raises(OutputError, match="earlier fine-tune"):
        finetune(tiny_model("llama"), tok, data, cfg, output_dir=out, resume=False)
    again = finetune(tiny_model("llama"), tok, data, cfg, output_dir=out, overwrite=True)
    assert again.resumed_from is None and not (out / "checkpoints").exists()
    shutil.rmtree(out)


def test_result_files_and_compare_folders_are_not_overwritten(tmp_path, user_folder):
    existing = user_folder / "thesis.tex"
    res = runner.invoke(app, ["bench", "--model", "no-such-model", "--out", str(existing)])
    assert res.exit_code == 2 and "the output file exists" in res.stderr and "--force" in res.stderr, res.output
    res = runner.invoke(app, ["compare", str(tmp_path / "no-run"), "--out", str(user_folder), "--force"])
    assert res.exit_code == 2 and "not written by qingzhou" in res.stderr, res.output
    assert _untouched(user_folder)


def test_saved_files_get_normal_permissions(tmp_path):
    """safetensors creates its files 0600; every file of a folder qingzhou writes gets the mode
    open() would give it (0666 less the umask), so another user or a serving container can read it."""
    import os

    from qingzhou.finetune.testing import byte_tokenizer, tiny_model
    from qingzhou.llm import save_model

    mask = os.umask(0)
    os.umask(mask)
    folder = save_model(tiny_model("llama"), byte_tokenizer(), tmp_path / "m")
    modes = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir() if f.is_file()}
    assert "model.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~mask)
