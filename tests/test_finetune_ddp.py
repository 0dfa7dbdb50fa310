"""A 2-process CPU DDP run (gloo) through `accelerate launch` matches one process with the same global batch."""
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

    out, batch = sys.argv[1], int(sys.argv[2])
    tok = byte_tokenizer()
    rows = [{"instruction": f"Grid code {i}?", "output": f"[ok] {i * 5 % 17} Hz"} for i in range(24)]
    data = prepare_data(DataConfig(source="<records>", eval_fraction=0.25, cache=False), tok, records=rows)
    res = finetune(tiny_model("qwen2"), tok, data, {"method": "lora", "max_steps": 6, "batch_size": batch,
                   "learning_rate": 1e-2, "dropout": 0.0, "progress": False}, output_dir=out)
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        json.dump({"world": world, "loss": res.train_loss, "eval": res.eval_loss_after}, open(out + "/losses.json", "w"))
''')


@pytest.mark.skipif(sys.platform == "win32", reason="gloo launcher test is POSIX only")
def test_two_process_gloo_matches_single_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "ddp_cpu_gloo.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(script), str(ddp), "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tmp_path / "single"
    single.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(single), "4"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((ddp / "losses.json").read_text())
    b = json.loads((single / "losses.json").read_text())
    assert a["world"] == 2 and b["world"] == 1
    for (_, la), (_, lb) in zip(a["loss"], b["loss"]):
        assert abs(la - lb) < 1e-4
    assert abs(a["eval"] - b["eval"]) < 1e-4
    assert a["loss"][-1][1] < a["loss"][0][1]
