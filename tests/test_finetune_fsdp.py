"""FSDP2 through `accelerate launch` on two CPU processes (gloo), the way a GPU cluster runs it.

For full fine-tuning and for LoRA, one launch of `qingzhou finetune` with the shipped
examples/accelerate/fsdp_cpu_gloo.yaml (full shard) must
* follow the single-process loss curve (same global batch) within 1e-4 for 10 steps,
* leave a gathered, plain safetensors folder that transformers (and peft, for the adapter) loads
  and that gives the single-process run's logits,
* when killed (SIGKILL of the main process at its step-7 fault point) after its sharded step-5
  checkpoint, resume from that checkpoint to the very weights of the uninterrupted run (checked
  bit for bit for full fine-tuning; for LoRA against the single process, within 1e-4).
The two-"node" launch (2 machines x 2 processes on localhost, FSDP shard-grad-op) trains and saves.
Each process imports torch/transformers/peft (~10 s on a busy 2-core machine), so every run here
is a separate launch of a 10-step run on a 2-layer, 64-wide model.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "accelerate"
FSDP_CPU = EXAMPLES / "fsdp_cpu_gloo.yaml"
ROWS = [{"instruction": f"Grid code {i}?", "output": f"[ok] {i * 5 % 17} Hz"} for i in range(24)]
KILL_AFTER = 7  # SIGKILL at this step's fault point; the newest checkpoint then is step 5
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="multi-process launcher tests are POSIX only")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QINGZHOU_FAULT", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_args(data: Path, model: Path, out: Path, method: str, batch: int, steps: int = 10,
                  save_every: int = 5) -> list[str]:
    """`qingzhou finetune` for these tests: 10 steps, checkpoint at 5, a quarter held out."""
    lr = "1e-3" if method == "full" else "1e-2"
    extra = ["--set", "dropout=0.0"] if method == "lora" else []
    return ["-m", "qingzhou.cli.main", "finetune", str(data), "--model", str(model), "--method", method,
            "--max-steps", str(steps), "-b", str(batch), "--lr", lr, "--eval-fraction", "0.25", "--no-cache",
            "--save-every", str(save_every), "--device", "cpu", "--out", str(out), "--json", *extra]


def launch(args: list[str], env: dict[str, str], *launch_flags: str, config: Path = FSDP_CPU,
           timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(_free_port()), *launch_flags, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _first_error(err: str, lines: int = 40) -> str:
    """From a launch's stderr, the lines from the first traceback or error on (or the tail): the
    launcher's own summary at the end names only the signal, not its cause."""
    text = err.splitlines()
    start = next((i for i, line in enumerate(text) if "Traceback" in line or "Error" in line or "terminate" in line), None)
    return "\n".join(text[start:start + lines] if start is not None else text[-lines:])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_nodes(cmds: list[list[str]], env: dict[str, str], port: int, logs: Path, timeout: float = 300) -> list:
    """Start node 0's launch, then (once its rendezvous store listens on `port`) the others, and
    wait for all of them. Returns [(node, returncode, first error lines)] for the nodes that
    failed. A node that fails stops the rest at once: its peers would otherwise wait out the
    process group's 30-minute timeout for it. On a hang every process gets SIGABRT first, so
    each Python process writes its stack (PYTHONFAULTHANDLER) into the report."""
    import contextlib
    import signal
    import time

    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    errs = [logs / f"node{i}.err" for i in range(len(cmds))]

    def start(i: int) -> None:
        with open(logs / f"node{i}.out", "w") as out, open(errs[i], "w") as err:
            procs.append(subprocess.Popen(cmds[i], env=env, stdout=out, stderr=err, start_new_session=True))

    def stop_all(sig: int) -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it may end between the poll and the kill
                    os.killpg(p.pid, sig)

    deadline = time.monotonic() + timeout
    start(0)
    while not _listening(port) and procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    for i in range(1, len(cmds)):
        start(i)
    hung = False
    while None in (codes := [p.poll() for p in procs]):
        if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
            hung = all(c in (None, 0) for c in codes)
            stop_all(signal.SIGABRT if hung else signal.SIGTERM)
            time.sleep(5)
            stop_all(signal.SIGKILL)
            break
        time.sleep(0.5)
    for p in procs:
        p.wait()
    report = []
    for i, p in enumerate(procs):
        if p.returncode != 0 or hung:
            text = errs[i].read_text(errors="replace")
            report.append((i, p.returncode, text[-6000:] if hung else _first_error(text)))
    return report


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _logits(folder: Path, base: Path, method: str):
    """Logits of the saved artifact loaded with plain transformers (+ peft for an adapter)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder if method == "full" else base), dtype=torch.float32)
    if method != "full":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
    ids = torch.tensor([[1, 40, 77, 90, 120, 33, 60, 200, 5, 9]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fsdp-data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_matches_single_process_resumes_and_gathers(tmp_path, tiny_llama_dir, rows_file, method):
    """Killed at step 7, resumed from the sharded step-5 checkpoint: the finished run follows the
    single-process curve and weights; for full fine-tuning an uninterrupted FSDP run is made too,
    which the resumed one must equal bit for bit (LoRA skips that launch to save CI time)."""
    import torch

    artifact = "model" if method == "full" else "adapter"
    fault_log = tmp_path / "faults.log"
    # one process, the same global batch; its fault points are those of a launch's main process
    single = subprocess.run([sys.executable, *finetune_args(rows_file, tiny_llama_dir, tmp_path / "single", method, 4)],
                            env=_env(QINGZHOU_FAULT_LOG=str(fault_log)), capture_output=True, text=True, timeout=600)
    _ok(single)
    at = max(int(n) for n, label in (line.split(" ", 1) for line in fault_log.read_text().splitlines())
             if label == f"step {KILL_AFTER}")
    # 2-process FSDP (full shard), the main process SIGKILLed at step 7, then the same command again
    killed = launch(finetune_args(rows_file, tiny_llama_dir, tmp_path / "fsdp", method, 2),
                    _env(QINGZHOU_FAULT_INJECT=f"{at}:SIGKILL"))
    assert killed.returncode != 0
    assert not (tmp_path / "fsdp" / artifact).exists()
    assert (tmp_path / "fsdp" / "checkpoints" / "step-0000005" / "state.json").is_file()
    run = launch(finetune_args(rows_file, tiny_llama_dir, tmp_path / "fsdp", method, 2), _env())
    _ok(run)
    assert run.stdout.count('"artifact_dir"') == 1  # the result printed once, by the main process
    a = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    b = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert a["resumed_from"] == 5
    assert [s for s, _ in a["train_loss"]] == list(range(1, 11)) == [s for s, _ in b["train_loss"]]
    for (_, la), (_, lb) in zip(a["train_loss"], b["train_loss"]):
        assert abs(la - lb) < 1e-4
    assert abs(a["eval_loss_after"] - b["eval_loss_after"]) < 1e-4
    assert a["train_loss"][-1][1] < a["train_loss"][0][1] - 0.1  # it learned

    # the checkpoint is sharded: one file per process of each kind, each about half the whole
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-0000005"
    parts = sorted(p.name for p in ckpt.glob("trainable.rank*.safetensors"))
    assert parts == ["trainable.rank00000-of-00002.safetensors", "trainable.rank00001-of-00002.safetensors"]
    assert json.loads((ckpt / "state.json").read_text())["shards"] == 2
    shard0 = _weights_file(ckpt / parts[0])
    whole = _weights(tmp_path / "fsdp" / artifact)
    assert sum(t.numel() for t in shard0.values()) <= 0.6 * sum(t.numel() for t in whole.values())

    # the gathered folder: every weight, plain safetensors, loads with transformers, logits of the single run
    single_w = _weights(tmp_path / "single" / artifact)
    assert sorted(whole) == sorted(single_w)
    assert max((whole[k] - single_w[k]).abs().max().item() for k in whole) < 1e-4
    la = _logits(tmp_path / "fsdp" / artifact, tiny_llama_dir, method)
    lb = _logits(tmp_path / "single" / artifact, tiny_llama_dir, method)
    assert (la - lb).abs().max().item() < 1e-3

    if method == "full":  # the resumed run is the uninterrupted one, bit for bit
        _ok(launch(finetune_args(rows_file, tiny_llama_dir, tmp_path / "uninterrupted", method, 2), _env()))
        ref = _weights(tmp_path / "uninterrupted" / artifact)
        assert sorted(ref) == sorted(whole)
        for k in whole:
            assert torch.equal(ref[k], whole[k]), k
        c = json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())
        assert [x for _, x in c["train_loss"]] == [x for _, x in a["train_loss"]]


def _weights_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_two_nodes_on_localhost_train_and_save(tmp_path, tiny_llama_dir, rows_file):
    """2 "machines" x 2 processes, both on 127.0.0.1, started as two launches the way two real
    nodes are (README: 'Training on several processes and machines'); FSDP shard-grad-op."""
    import torch
    from transformers import AutoModelForCausalLM

    port = _free_port()
    args = finetune_args(rows_file, tiny_llama_dir, tmp_path / "nodes", "full", 2, steps=6, save_every=3)
    nodes = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU), "--num_machines", "2",
              "--num_processes", "4", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(port), "--fsdp_reshard_after_forward", "false", *args] for rank in (0, 1)]
    failed = run_nodes(nodes, _env(PYTHONFAULTHANDLER="1"), port, tmp_path / "logs")
    assert not failed, failed  # each failed node's first error lines (or, after a hang, every stack)
    single_args = finetune_args(rows_file, tiny_llama_dir, tmp_path / "single", "full", 8, steps=6, save_every=3)
    _ok(subprocess.run([sys.executable, *single_args], env=_env(), capture_output=True, text=True, timeout=600))
    a = json.loads((tmp_path / "nodes" / "metrics.json").read_text())
    b = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert len(a["train_loss"]) == 6
    for (_, la), (_, lb) in zip(a["train_loss"], b["train_loss"]):
        assert abs(la - lb) < 1e-4
    ckpt = tmp_path / "nodes" / "checkpoints" / "step-0000003"
    assert len(list(ckpt.glob("trainable.rank*-of-00004.safetensors"))) == 4
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "nodes" / "model"), dtype=torch.float32)
    ref = _weights(tmp_path / "single" / "model")
    for name, p in model.state_dict().items():
        assert (p - ref[name]).abs().max().item() < 1e-4, name


# --- bad input: refused before training, one paragraph, exit 2 (what every process of a launch prints) ---

def _fsdp_launch_env(**overrides: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file fsdp_cpu_gloo.yaml` exports to each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(FSDP_CPU), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    return {**env, **overrides}


@pytest.mark.parametrize("extra,env,expect", [
    (["--method", "qlora"], {}, ["QLoRA cannot be trained under FSDP", "method: qlora"]),
    (["--method", "lora", "--optimizer", "adamw_8bit"], {}, ["adamw_8bit", "sharded parameters", "optimizer: adamw"]),
    (["--method", "full"], {"FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen2DecoderLayer"},
     ["names ['Qwen2DecoderLayer']", "fsdp_transformer_layer_cls_to_wrap", "candidates: LlamaDecoderLayer"]),
    (["--method", "lora"], {"ACCELERATE_USE_FSDP": "false", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "2",
                            "GROUP_WORLD_SIZE": "2", "GROUP_RANK": "1"},
     ["does not add up", "2 node(s) (num_machines) x 2 process(es)", "3 processes", "node 1"]),
], ids=["qlora", "bnb-optimizer", "wrap-class", "node-count"])
def test_bad_sharded_launch_is_refused_before_training(tmp_path, tiny_llama_dir, rows_file, extra, env, expect):
    from typer.testing import CliRunner

    from qingzhou.cli.main import app

    out = tmp_path / "out"
    args = ["finetune", str(rows_file), "--model", str(tiny_llama_dir), "--max-steps", "2", "--device", "cpu",
            "--out", str(out), "--no-cache", *extra]
    res = CliRunner().invoke(app, args, env=_fsdp_launch_env(**env))
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for piece in expect:
        assert piece in text, (piece, text)
    assert not (out / "checkpoints").exists() and not (out / "model").exists() and not (out / "adapter").exists()


def test_wrap_check_names_a_model_without_layer_classes(monkeypatch):
    """A model that declares no decoder-layer class (no _no_split_modules) and a config naming none."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from qingzhou.errors import RecipeError
    from qingzhou.finetune.methods import parse_finetune_config
    from qingzhou.finetune.sharding import check_fsdp_model

    for key, value in _fsdp_launch_env().items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    with pytest.raises(RecipeError, match="found no layer class") as err:
        check_fsdp_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), parse_finetune_config({"method": "full"}), plugin)
    assert "SIZE_BASED_WRAP" in str(err.value)
