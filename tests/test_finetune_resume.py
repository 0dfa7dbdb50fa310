"""Interrupt at step k, resume, and the final adapter equals an uninterrupted run's."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qingzhou.data import DataConfig, prepare_data
from qingzhou.errors import RecipeError
from qingzhou.finetune import finetune
from qingzhou.finetune.checkpoint import latest_checkpoint
from qingzhou.finetune.testing import byte_tokenizer, tiny_model

ROWS = [{"instruction": f"Code for item {i}?", "output": f"[ok] item-{i * 7 % 13}"} for i in range(20)]


class Crash(Exception):
    pass


def _crash_at(k):
    def cb(step, metrics):
        if step == k:
            raise Crash(f"simulated crash at step {k}")

    return cb


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_equals_uninterrupted(method, tmp_path):
    torch.set_num_threads(1)
    tok = byte_tokenizer()
    data = prepare_data(DataConfig(source="<records>", eval_fraction=0.1, cache=False), tok, records=ROWS)
    # dropout > 0 so the restored RNG state matters; 12 steps over 18 rows = several epochs, so the
    # per-epoch shuffles must replay too
    cfg = {"method": method, "max_steps": 12, "batch_size": 4, "learning_rate": 3e-3, "save_every": 4,
           "progress": False, "seed": 5, **({"dropout": 0.1} if method == "lora" else {})}
    full = finetune(tiny_model("llama"), tok, data, cfg, output_dir=tmp_path / "straight")

    with pytest.raises(Crash):
        finetune(tiny_model("llama"), tok, data, cfg, output_dir=tmp_path / "crashed", callbacks=[_crash_at(6)])
    assert latest_checkpoint(tmp_path / "crashed").name == "step-0000004"
    # a fresh process reloads the same base; for full fine-tuning every weight comes from the checkpoint
    base_seed = 123 if method == "full" else 0
    torch.manual_seed(999)  # the RNG state the resumed process happens to start with must not matter
    resumed = finetune(tiny_model("llama", seed=base_seed), tok, data, cfg, output_dir=tmp_path / "crashed")
    assert resumed.resumed_from == 4
    assert [s for s, _ in resumed.train_loss] == list(range(1, 13))
    for (_, a), (_, b) in zip(full.train_loss, resumed.train_loss):
        assert abs(a - b) < 1e-5

    name = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    w_full = load_file(str(tmp_path / "straight" / name))
    w_res = load_file(str(tmp_path / "crashed" / name))
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        assert torch.allclose(w_full[k], w_res[k], atol=1e-6), k
    # and training actually changed the weights (the comparison is not vacuous)
    assert abs(full.eval_loss_after - full.eval_loss_before) > 1e-3


def test_resume_refuses_different_data(tmp_path):
    tok = byte_tokenizer()
    data = prepare_data(DataConfig(source="<records>", eval_fraction=0.1, cache=False), tok, records=ROWS)
    cfg = {"method": "lora", "max_steps": 6, "batch_size": 4, "save_every": 2, "progress": False}
    with pytest.raises(Crash):
        finetune(tiny_model("llama"), tok, data, cfg, output_dir=tmp_path, callbacks=[_crash_at(3)])
    other = prepare_data(DataConfig(source="<records>", eval_fraction=0.1, cache=False), tok, records=ROWS[:-2])
    with pytest.raises(RecipeError, match="different data"):
        finetune(tiny_model("llama"), tok, other, cfg, output_dir=tmp_path)
