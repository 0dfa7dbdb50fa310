"""Streaming compression (`compress.streaming`): a model on the meta device, compressed one decoder
layer at a time from its safetensors shards, gives bit-identical tensors to the in-memory path,
resumes after an interruption to the same bytes, and never holds more than one layer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qingzhou import signals
from qingzhou.compress.prune import prune
from qingzhou.compress.quantize import quantize
from qingzhou.errors import QingzhouError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
GPTQ = {"method": "gptq", "bits": 4, "group_size": 32}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A 3-layer tiny Llama saved as a plain HF folder (fp32 safetensors)."""
    from qingzhou.finetune.testing import byte_tokenizer, tiny_model
    from qingzhou.llm import save_model

    folder = tmp_path_factory.mktemp("stream-src") / "model"
    save_model(tiny_model("llama", num_hidden_layers=3), byte_tokenizer(), folder)
    return folder


@pytest.fixture(scope="module")
def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, 270, (32,), generator=g) for _ in range(6)]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every tensor equal bit for bit; the in-memory GPTQ writer stores the unquantised float
    tensors (embeddings, norms) in 16 bits while streaming keeps the source dtype, so those are
    compared after the same cast (the packed tensors, scales and zeros are compared as stored)."""
    assert set(a) == set(b)

    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        if x.dtype != y.dtype and x.is_floating_point() and y.is_floating_point():
            low = x.dtype if x.element_size() < y.element_size() else y.dtype
            return torch.equal(x.to(low), y.to(low))
        return x.dtype == y.dtype and torch.equal(x, y)

    diff = [k for k in a if not same(a[k], b[k])]
    assert not diff, diff


def in_memory(src: Path, verb, cfg: dict, calib, out: Path, **kw):
    from qingzhou.llm import load_model

    model, tok = load_model(str(src), dtype="float32", device="cpu")
    return verb(model, dict(cfg), calib, tokenizer=tok, output_dir=out, **kw)


@pytest.mark.parametrize("activations", ["cpu", "disk"])
def test_streaming_gptq_is_bit_identical_to_in_memory(src, calib, tmp_path, activations):
    ref = in_memory(src, quantize, GPTQ, calib, tmp_path / "mem")
    rep = quantize(str(src), dict(GPTQ), calib, output_dir=tmp_path / "st", streaming=True, activations=activations)
    out = tmp_path / "st"
    a, b = tensors(tmp_path / "mem"), tensors(out)
    assert sum(k.endswith(".qweight") for k in b) == 3 * 7  # packed GPTQ layout, every linear
    assert_same(a, b)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{k}-of-00004.safetensors" for k in (1, 2, 3, 4)]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4 and cfg["quantization_config"]["group_size"] == 32
    assert (out / ".qingzhou").exists() and (out / "tokenizer.json").exists()
    assert not list(out.glob("acts-*")) and not (out / "progress.json").exists()
    assert not (tmp_path / ".st.streaming").exists()  # the work folder became the output
    assert rep.summary()["linear_mb_after"] == ref.summary()["linear_mb_after"]
    assert rep.modules.keys() == ref.modules.keys()
    assert [rep.modules[n]["loss"] for n in rep.modules] == [ref.modules[n]["loss"] for n in rep.modules]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streaming_pruning_is_bit_identical_to_in_memory(src, calib, tmp_path, method):
    cfg = {"method": method, "sparsity": 0.5}
    ref = in_memory(src, prune, cfg, calib, tmp_path / "mem")
    rep = prune(str(src), dict(cfg), calib, output_dir=tmp_path / "st", streaming=True)
    assert_same(tensors(tmp_path / "mem"), tensors(tmp_path / "st"))
    assert rep.sparsity == ref.sparsity and 0.49 < rep.sparsity <= 0.5
    assert rep.model_sparsity == ref.model_sparsity and rep.layers == ref.layers


def fault_labels(src, calib, tmp_path, monkeypatch) -> list[str]:
    """The fault points of one uninterrupted streaming GPTQ run, in order."""
    log = tmp_path / "faults.log"
    monkeypatch.setenv("QINGZHOU_FAULT_LOG", str(log))
    monkeypatch.setattr(signals, "_fault_count", 0)
    quantize(str(src), dict(GPTQ), calib, output_dir=tmp_path / "ref", streaming=True)
    monkeypatch.delenv("QINGZHOU_FAULT_LOG")
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


def test_interrupted_stream_resumes_to_the_same_bytes(src, calib, tmp_path, monkeypatch):
    labels = fault_labels(src, calib, tmp_path, monkeypatch)
    ref = tensors(tmp_path / "ref")
    # stop before the rename of layer 2's shard, of the progress record after it (layer 2 is redone
    # from layer 1's checkpointed outputs), and of the finished folder
    stops = [labels.index("write model-00002-of-00004.safetensors") + 1,
             labels.index("write model-00003-of-00004.safetensors"),  # progress.json after layer 2
             labels.index("commit ref") + 1]
    assert labels[stops[1] - 1] == "write progress.json"
    resumed = []
    for stop in stops:
        out = tmp_path / f"out{stop}" / "ref"  # the same folder name: the same fault labels
        monkeypatch.setenv("QINGZHOU_FAULT_INJECT", f"{stop}:SIGINT")
        monkeypatch.setattr(signals, "_fault_count", 0)
        with pytest.raises(KeyboardInterrupt):
            quantize(str(src), dict(GPTQ), calib, output_dir=out, streaming=True)
        monkeypatch.delenv("QINGZHOU_FAULT_INJECT")
        assert not out.exists()  # nothing a reader would trust
        assert (out.parent / ".ref.streaming" / "progress.json").exists()
        rep = quantize(str(src), dict(GPTQ), calib, output_dir=out, streaming=True)
        assert_same(ref, tensors(out))
        resumed.append(rep.calibration["resumed_from_layer"])
    assert resumed == [1, 1, 3]


def test_killed_stream_resumes_to_the_same_bytes(src, calib, tmp_path, monkeypatch):
    """SIGKILL (no cleanup at all) in the middle of layer 2's shard write, in a separate process."""
    labels = fault_labels(src, calib, tmp_path, monkeypatch)
    stop = labels.index("write model-00002-of-00004.safetensors") + 1
    script = (f"import torch; from qingzhou.compress.quantize import quantize\n"
              f"g = torch.Generator().manual_seed(0)\n"
              f"calib = [torch.randint(5, 270, (32,), generator=g) for _ in range(6)]\n"
              f"quantize({str(src)!r}, {GPTQ!r}, calib, output_dir={str(tmp_path / 'out')!r}, streaming=True)\n")
    env = {**os.environ, "QINGZHOU_FAULT_INJECT": f"{stop}:SIGKILL", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    work = tmp_path / ".out.streaming"
    assert json.loads((work / "progress.json").read_text())["done"] == 1
    assert list(work.glob(".model-00002*.tmp"))  # the half-written shard is still lying there
    rep = quantize(str(src), dict(GPTQ), calib, output_dir=tmp_path / "out", streaming=True)
    assert rep.calibration["resumed_from_layer"] == 1
    assert_same(tensors(tmp_path / "ref"), tensors(tmp_path / "out"))
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_only_one_layer_is_materialised_at_a_time(src, calib, tmp_path):
    """The engine on a meta model: at every callback at most one decoder layer holds real tensors,
    and the embeddings are back on the meta device."""
    from qingzhou.compress.calibrate import LayerwiseOptions, run_layerwise
    from qingzhou.compress.streaming import open_stream

    stream = open_stream(src, tmp_path / "out")
    model = stream.model
    layers = model.model.layers
    seen: list[int] = []

    class Probe:
        results: dict = {}

        def add_batch(self, name, module, x):
            real = [i for i, layer in enumerate(layers) if any(p.device.type != "meta" for p in layer.parameters())]
            assert len(real) == 1, real
            assert model.model.embed_tokens.weight.device.type == "meta"
            seen.append(real[0])

        def finish_group(self, index, layer, modules):
            pass

    before = [p.device.type for p in model.parameters()]
    assert set(before) == {"meta"}
    run_layerwise(model, calib, Probe(), LayerwiseOptions(stream=stream))
    assert sorted(set(seen)) == [0, 1, 2] and stream.max_loaded == 1
    assert {p.device.type for p in model.parameters()} == {"meta"}  # all released again
    assert len(list(stream.work.glob("model-*.safetensors"))) == 4


def test_streaming_refuses_what_it_cannot_do(src, calib, tmp_path):
    with pytest.raises(QingzhouError, match="OWL"):
        prune(str(src), {"method": "wanda", "sparsity": 0.5, "owl": {}}, calib, output_dir=tmp_path / "o", streaming=True)
    with pytest.raises(QingzhouError, match="output folder"):
        quantize(str(src), dict(GPTQ), calib, streaming=True)
    with pytest.raises(QingzhouError, match="folder path"):
        quantize(torch.nn.Linear(2, 2), dict(GPTQ), calib, output_dir=tmp_path / "o", streaming=True)
    with pytest.raises(QingzhouError, match="gguf"):
        quantize(str(src), dict(GPTQ), calib, output_dir=tmp_path / "o", streaming=True, save_format="gguf")
    quantize(str(src), dict(GPTQ), calib, output_dir=tmp_path / "q", streaming=True)
    with pytest.raises(QingzhouError, match="already quantised"):
        quantize(str(tmp_path / "q"), dict(GPTQ), calib, output_dir=tmp_path / "o", streaming=True)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "half" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(QingzhouError, match="missing: model-00002-of-00002"):
        quantize(str(tmp_path / "half"), dict(GPTQ), calib, output_dir=tmp_path / "o", streaming=True)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.streaming").exists()


@pytest.mark.parametrize("verb,flags", [("quantize", ["--method", "gptq", "--bits", "4", "--group-size", "32"]),
                                        ("prune", ["--method", "wanda", "--sparsity", "0.5", "--activations", "disk"])])
def test_cli_streaming_matches_the_in_memory_command(src, tmp_path, verb, flags):
    from typer.testing import CliRunner

    from qingzhou.cli.main import app

    common = [*flags, "--num-samples", "4", "--seq-len", "32", "--json"]
    runner = CliRunner()
    mem = runner.invoke(app, [verb, str(src), str(tmp_path / "mem"), *common], catch_exceptions=False)
    st = runner.invoke(app, [verb, str(src), str(tmp_path / "st"), *common, "--streaming"], catch_exceptions=False)
    assert mem.exit_code == 0 and st.exit_code == 0, st.output
    assert_same(tensors(tmp_path / "mem"), tensors(tmp_path / "st"))
    assert json.loads(st.stdout)["out_dir"] == str(tmp_path / "st")


def test_bf16_shards_stream_in_the_dtype_asked_for(src, calib, tmp_path):
    """A bf16 checkpoint quantised in fp32: streaming casts each layer as loading does."""
    from qingzhou.llm import load_model, save_model

    model, tok = load_model(str(src), dtype="bfloat16", device="cpu")
    save_model(model, tok, tmp_path / "bf16", max_shard_size="100KB")
    assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 2  # really sharded
    in_memory(tmp_path / "bf16", quantize, GPTQ, calib, tmp_path / "mem")
    quantize(str(tmp_path / "bf16"), dict(GPTQ), calib, output_dir=tmp_path / "st", streaming=True, dtype="float32")
    assert_same(tensors(tmp_path / "mem"), tensors(tmp_path / "st"))
    quantize(str(tmp_path / "bf16"), dict(GPTQ), calib, output_dir=tmp_path / "st16", streaming=True)
    assert tensors(tmp_path / "st16")["model.norm.weight"].dtype == torch.bfloat16  # default: as stored


def test_dense_target_stream_resumes_to_the_same_bytes(src, calib, tmp_path, monkeypatch):
    """GPTQ with dense targets carries the dense model's hidden states between layers: streamed,
    it equals the in-memory run, and a run stopped after layer 1 resumes from the checkpointed
    dense states (a resume from the compressed ones would give other weights)."""
    cfg = {**GPTQ, "bits": 3, "dense_target": 0.5}
    in_memory(src, quantize, cfg, calib, tmp_path / "mem")
    mem = tensors(tmp_path / "mem")
    plain = tmp_path / "plain"
    quantize(str(src), {**cfg, "dense_target": 0.0}, calib, output_dir=plain, streaming=True)
    assert any(not torch.equal(v, tensors(plain)[k]) for k, v in mem.items() if k.endswith(".qweight"))
    log = tmp_path / "faults.log"
    monkeypatch.setenv("QINGZHOU_FAULT_LOG", str(log))
    monkeypatch.setattr(signals, "_fault_count", 0)
    quantize(str(src), dict(cfg), calib, output_dir=tmp_path / "ref", streaming=True)
    monkeypatch.delenv("QINGZHOU_FAULT_LOG")
    assert_same(mem, tensors(tmp_path / "ref"))
    labels = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    stop = labels.index("write model-00003-of-00004.safetensors")  # progress.json after layer 2
    out = tmp_path / "again" / "ref"
    monkeypatch.setenv("QINGZHOU_FAULT_INJECT", f"{stop}:SIGINT")
    monkeypatch.setattr(signals, "_fault_count", 0)
    with pytest.raises(KeyboardInterrupt):
        quantize(str(src), dict(cfg), calib, output_dir=out, streaming=True)
    monkeypatch.delenv("QINGZHOU_FAULT_INJECT")
    assert list((out.parent / ".ref.streaming").glob("carried-*.bin"))
    rep = quantize(str(src), dict(cfg), calib, output_dir=out, streaming=True)
    assert rep.calibration["resumed_from_layer"] == 1
    assert_same(mem, tensors(out))
    assert not list(out.glob("carried-*"))
