"""A 2-process CPU run through `accelerate launch` matches one process with the same global batch.

DDP over gloo always runs. DeepSpeed ZeRO-2 and ZeRO-3 (the shipped example configs, on 2
processes, offload off) run where deepspeed is installed: on two GPUs, or on CPU with DeepSpeed's
CPU accelerator over gloo (DS_ACCELERATOR=cpu; accelerate 1.15 counts one process there and the
loop takes the count from the process group). They also check gradient accumulation against the
engine's own boundary handling, and the ZeRO-3 run's final model is gathered from its partitions.
The first CPU launch builds DeepSpeed's shared-memory op (minutes; cached afterwards).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    torch.set_num_threads(1)
    from qingzhou.data import DataConfig, prepare_data
    from qingzhou.finetune import finetune
    from qingzhou.finetune.testing import byte_tokenizer, tiny_model

    out, batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tok = byte_tokenizer()
    rows = [{"instruction": f"Grid code {i}?", "output": f"[ok] {i * 5 % 17} Hz"} for i in range(32)]  # 24 training rows: whole steps per epoch for every batch split
    data = prepare_data(DataConfig(source="<records>", eval_fraction=0.25, cache=False), tok, records=rows)
    res = finetune(tiny_model("qwen2"), tok, data, {"method": "lora", "max_steps": 6, "batch_size": batch, "grad_accum": accum,
                   "learning_rate": 1e-2, "dropout": 0.0, "progress": False}, output_dir=out)
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        json.dump({"world": world, "loss": res.train_loss, "eval": res.eval_loss_after}, open(out + "/losses.json", "w"))
''')


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


DEEPSPEED_CONFIGS = {"deepspeed": "deepspeed_zero2.yaml", "deepspeed3": "deepspeed_zero3_offload.yaml"}


def _deepspeed_test_config(tmp_path: Path, kind: str) -> Path:
    import yaml

    cfg = yaml.safe_load((EXAMPLES / DEEPSPEED_CONFIGS[kind]).read_text())
    cfg.update(num_processes=2, mixed_precision="no", main_process_port=29563, gpu_ids="0,1")
    cfg["deepspeed_config"].update(offload_optimizer_device="none", offload_param_device="none")
    out = tmp_path / f"{kind}_test.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _deepspeed_runs() -> bool:
    import importlib.util

    import torch

    on_gpus = torch.cuda.device_count() >= 2
    return importlib.util.find_spec("deepspeed") is not None and (on_gpus or not torch.cuda.is_available())


@pytest.mark.skipif(sys.platform == "win32", reason="multi-process launcher test is POSIX only")
@pytest.mark.parametrize("kind,batch,accum", [
    ("ddp", 2, 1),
    pytest.param("deepspeed", 1, 2, marks=pytest.mark.skipif(not _deepspeed_runs(), reason="needs deepspeed (2 GPUs or CPU)")),
    pytest.param("deepspeed3", 1, 2, marks=pytest.mark.skipif(not _deepspeed_runs(), reason="needs deepspeed (2 GPUs or CPU)")),
])
def test_two_process_run_matches_single_process(tmp_path, kind, batch, accum):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    config = EXAMPLES / "ddp_cpu_gloo.yaml" if kind == "ddp" else _deepspeed_test_config(tmp_path, kind)
    if kind != "ddp":
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(script),
           str(ddp), str(batch), str(accum)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tmp_path / "single"
    single.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(single), "4", "1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((ddp / "losses.json").read_text())
    b = json.loads((single / "losses.json").read_text())
    assert a["world"] == 2 and b["world"] == 1
    for (_, la), (_, lb) in zip(a["loss"], b["loss"]):
        assert abs(la - lb) < 1e-4
    assert abs(a["eval"] - b["eval"]) < 1e-4
    assert a["loss"][-1][1] < a["loss"][0][1]
    # the saved adapter is the whole trained one (under ZeRO-3 gathered from the partitions)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (ddp, single))
    assert sorted(wa) == sorted(wb) and all(wa[k].shape == wb[k].shape for k in wa)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
