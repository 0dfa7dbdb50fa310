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
    model = tiny_model(arch)
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


def _copy_with_config(src: Path, dest: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(changes)
    if "num_hidden_layers" in changes:
        cfg.pop("layer_types", None)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_config_with_more_layers_than_the_weights_is_refused_unless_not_strict(tiny_llama_dir, tmp_path):
    """3 layers in config.json, 2 in the weights: strict loading names the missing tensors instead of
    returning a model with a randomly initialised third layer; strict=False is the explicit opt-in."""
    folder = _copy_with_config(tiny_llama_dir, tmp_path / "three", num_hidden_layers=3)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder), device="cpu")
    msg = str(e.value)
    assert "9 tensor(s) the architecture needs are missing" in msg
    assert "model.layers.2.mlp.down_proj.weight" in msg and "model.layers.1." not in msg
    assert "--no-strict" in msg
    loose, _ = load_model(str(folder), device="cpu", strict=False)
    saved, _ = load_model(str(tiny_llama_dir), device="cpu")
    assert describe_model(loose)["layers"] == 3
    assert torch.equal(loose.model.layers[1].mlp.down_proj.weight, saved.model.layers[1].mlp.down_proj.weight)


def test_mis_shaped_and_unexpected_tensors_are_named(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    wide = _copy_with_config(tiny_llama_dir, tmp_path / "wide", intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"6 tensor\(s\) have the wrong shape.*model.layers.0.mlp.down_proj.weight: "
                                             r"checkpoint \[64, 128\] vs model \[64, 96\]"):
        load_model(str(wide), device="cpu")
    extra = _copy_with_config(tiny_llama_dir, tmp_path / "extra")
    state = load_file(str(extra / "model.safetensors"))
    state["model.layers.5.mlp.up_proj.weight"] = torch.zeros(4, 4)
    save_file(state, str(extra / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"1 tensor\(s\) in the checkpoint are not used.*model.layers.5.mlp.up_proj.weight"):
        load_model(str(extra), device="cpu")


def test_strict_loading_accepts_tied_weights_gguf_and_gptq_folders(tmp_path):
    """Tied embeddings (lm_head not saved), a GGUF file and a GPTQ-layout folder all load strictly."""
    from qingzhou.compress.quantize import quantize, save_quantized
    from qingzhou.compress.quantize.formats.gguf import export_gguf

    tied = tiny_model("qwen2", tie_word_embeddings=True)
    save_model(tied, byte_tokenizer(), tmp_path / "tied")
    loaded, _ = load_model(str(tmp_path / "tied"), device="cpu")
    assert torch.allclose(logits(tied), logits(loaded), atol=1e-5)

    model = tiny_model("llama")
    export_gguf(model, byte_tokenizer(), tmp_path / "g" / "model.gguf", "f32")
    from_gguf, _ = load_model(str(tmp_path / "g" / "model.gguf"), device="cpu")
    assert torch.allclose(logits(model), logits(from_gguf), atol=1e-4)

    quantize(model, {"method": "rtn", "bits": 4, "group_size": 32})
    save_quantized(model, byte_tokenizer(), tmp_path / "q")
    from_gptq, _ = load_model(str(tmp_path / "q"), device="cpu")
    assert torch.allclose(logits(model), logits(from_gptq), atol=1e-4)


def test_only_org_name_strings_without_a_file_suffix_go_to_the_hub(tmp_path):
    assert resolve_source("Qwen/Qwen2.5-0.5B").kind == "hub"
    for path in ("org/model.safetensors", "someone/config.json", "data/weights.bin", "./org/name", "just-a-name"):
        with pytest.raises(ModelLoadError, match="no model found"):
            resolve_source(path)


def test_pickle_only_adapter_is_refused_unless_allowed(tiny_llama_dir, tmp_path):
    from qingzhou.finetune import export_merged
    from qingzhou.llm.loading import check_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tiny_llama_dir)}))
    (adapter / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelLoadError, match=r"only as pickle \(adapter_model.bin\).*--allow-pickle"):
        resolve_source(str(adapter))
    with pytest.raises(ModelLoadError, match="only as pickle"):
        export_merged(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert check_adapter(adapter, "a", allow_pickle=True).weights == [str(adapter / "adapter_model.bin")]
