"""Model loading and saving on tiny random models: round trips, safety refusals, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qingzhou.errors import ModelLoadError
from qingzhou.finetune.testing import byte_tokenizer, tiny_model
from qingzhou.llm import describe_model, load_model, resolve_source, save_model

IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 7]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_save_then_plain_from_pretrained_gives_same_logits(arch, tmp_path):
    model = tiny_model(arch, **({"head_dim": 16} if arch == "gemma" else {}))
    save_model(model, byte_tokenizer(), tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert not list((tmp_path / "m").glob("*.bin"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert torch.allclose(logits(model), logits(plain), atol=1e-5)
    ours, tok = load_model(str(tmp_path / "m"), dtype="float32", device="cpu")
    assert torch.allclose(logits(model), logits(ours), atol=1e-5)
    assert tok.decode(tok("hello").input_ids) == "hello"


def test_describe_model_counts_parameters(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), device="cpu")
    info = describe_model(model)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["layers"] == 2 and info["dtype"] == "float32" and info["device"] == "cpu"


def test_pickle_weights_refused_unless_allowed(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "pk")
    byte_tokenizer().save_pretrained(tmp_path / "pk")
    for f in (tmp_path / "pk").glob("*.safetensors"):  # rewrite the weights the old pickle way
        f.unlink()
    torch.save(model.state_dict(), tmp_path / "pk" / "pytorch_model.bin")
    assert (tmp_path / "pk" / "pytorch_model.bin").exists()
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(str(tmp_path / "pk"), device="cpu")
    loaded, _ = load_model(str(tmp_path / "pk"), device="cpu", allow_pickle=True)
    assert torch.allclose(logits(model), logits(loaded), atol=1e-5)


def test_remote_code_refused_unless_trusted(tiny_llama_dir, tmp_path):
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(tiny_llama_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(str(folder), device="cpu")


def test_missing_and_corrupt_weights_are_clear_errors(tiny_llama_dir, tmp_path):
    import shutil

    with pytest.raises(ModelLoadError, match="no model found"):
        load_model(str(tmp_path / "nope"), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weight files"):
        load_model(str(empty), device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: 200])
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(str(broken), device="cpu")


def test_source_kinds(tiny_llama_dir, tmp_path):
    assert resolve_source(str(tiny_llama_dir)).kind == "folder"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "x.gguf"))
    src = resolve_source("smollm2")
    assert src.kind == "gguf" and Path(src.path).is_file() and src.path.endswith(".gguf")


def test_save_is_atomic_and_keeps_old_folder_on_failure(tiny_llama_dir, tmp_path):
    import shutil

    target = tmp_path / "out"
    shutil.copytree(tiny_llama_dir, target)
    before = sorted(p.name for p in target.iterdir())

    class Exploding:
        config = tiny_model("llama").config

        def save_pretrained(self, folder, **kw):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_model(Exploding(), None, target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
