"""A short LoRA run of SmolLM2-135M-Instruct on LLaMA-Factory's alpaca_en_demo: held-out loss before/after.

Usage: python bench/finetune_smollm2_alpaca.py [--steps 40] [--threads 2]
Reads ../shared/data/llamafactory/alpaca_en_demo.json (not shipped with the package).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory" / "alpaca_en_demo.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from qingzhou.data import DataConfig
    from qingzhou.finetune import finetune
    from qingzhou.llm import load_model

    t0 = time.perf_counter()
    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    load_s = time.perf_counter() - t0
    data = DataConfig(source=str(DATA), max_length=args.max_length, packing=True, eval_fraction=0.03, seed=0)
    out = args.out or tempfile.mkdtemp(prefix="qz-smollm2-lora-")
    res = finetune(model, tok, data, {"method": "lora", "r": 16, "alpha": 32, "max_steps": args.steps,
                                      "batch_size": args.batch_size, "learning_rate": args.lr, "warmup_ratio": 0.1},
                   output_dir=out)
    print(json.dumps({
        "load_s": round(load_s, 1), "train_s": round(res.seconds, 1), "steps": res.steps,
        "eval_samples": res.data["eval_samples"], "train_rows": res.data["train_samples"],
        "eval_loss_before": res.eval_loss_before, "eval_loss_after": res.eval_loss_after,
        "first_train_loss": res.train_loss[0][1], "last_train_loss": res.train_loss[-1][1],
        "tokens_per_s": round(res.tokens_per_s, 1), "peak_memory_mb": round(res.peak_memory_mb),
        "trainable_params": res.trainable_params, "adapter": res.artifact_dir,
    }, indent=2))


if __name__ == "__main__":
    main()
