"""qingzhou's training loop against the strongest baselines a user would reach for: tokens/s and peak memory.

Same model (SmolLM2-135M, 49k vocabulary, saved once as a plain HF folder every arm loads), same
alpaca rows, method, LoRA rank (16, alpha 32, all seven linear kinds), sequence length, learning-rate
schedule, steps and *real tokens per optimizer step* (`--tokens-per-step`):

| arm | what it is |
|---|---|
| `qingzhou`     | our one loop, packed rows of `--max-length` (position ids reset per sample) |
| `hf_flatten`   | transformers `Trainer` + peft with `DataCollatorWithFlattening` (padding-free) |
| `hf_pad`       | transformers `Trainer` + peft, padded batches (the old baseline, for reference) |
| `trl`          | TRL `SFTTrainer`, `packing=True` (best-fit-decreasing, padding-free); its own venv |
| `llamafactory` | LLaMA-Factory's SFT workflow with `packing: true`; its own venv |

Each arm runs in its own process (peak RSS is per arm) and is timed the same way (see
`bench/peers/sft_arm.py`): tokens/s over optimizer steps 2..N, real tokens only. The peers' venvs
come from `QZ_TRL_PYTHON` / `QZ_LF_PYTHON` (default /work/peers/{trl,lf}/bin/python); an arm whose
venv is missing is reported as absent, not skipped silently.

    python bench/finetune_speed.py                                     # SmolLM2, LoRA, 10 steps, all arms
    python bench/finetune_speed.py --methods lora full qlora --steps 12
    python bench/finetune_speed.py --model tiny --steps 4 --arms qingzhou hf_flatten   # smoke run
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QZ_SHARED", ROOT.parent / "shared")) / "data" / "llamafactory" / "alpaca_en_demo.json"
ARM_SCRIPT = ROOT / "bench" / "peers" / "sft_arm.py"
PEER_PYTHON = {"trl": os.environ.get("QZ_TRL_PYTHON", "/work/peers/trl/bin/python"),
               "llamafactory": os.environ.get("QZ_LF_PYTHON", "/work/peers/lf/bin/python")}
ARMS = ["qingzhou", "hf_flatten", "hf_pad", "trl", "llamafactory"]
LORA_DROPOUT = 0.0  # the default of peft, LLaMA-Factory, torchtune and qingzhou



def _lr(method: str) -> float:
    return 1e-5 if method == "full" else 1e-4


def model_folder(name: str, cache: Path) -> Path:
    """The model as a plain HF folder (fp32 safetensors + tokenizer) that every framework loads."""
    folder = cache / f"{name}-hf"
    if (folder / "config.json").is_file():
        return folder
    if name == "tiny":
        from qingzhou.finetune.testing import tiny_model
        from qingzhou.llm import load_model

        smol_tok = load_model("smollm2", dtype="float32", device="cpu")[1]  # a real 49k vocabulary
        model = tiny_model("llama", num_hidden_layers=2, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=2048, vocab_size=len(smol_tok))
        tok = smol_tok
    else:
        from qingzhou.llm import load_model

        model, tok = load_model(name, dtype="float32", device="cpu")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def write_rows(folder: Path, out: Path, args) -> tuple[Path, float]:
    """qingzhou's tokenisation of the alpaca rows (chat template, loss on answers) for the HF/TRL arms."""
    from transformers import AutoTokenizer

    from qingzhou.data import DataConfig, prepare_data

    tok = AutoTokenizer.from_pretrained(folder)
    data = prepare_data(DataConfig(source=str(DATA), max_length=args.max_length, eval_fraction=0,
                                   max_samples=args.rows, cache=False), tok)
    with open(out, "w") as f:
        for e in data.train:
            f.write(json.dumps({"input_ids": e.input_ids, "labels": e.labels}) + "\n")
    return out, sum(len(e) for e in data.train) / len(data.train)


def arm_qingzhou(args, method: str, folder: str, queue) -> None:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sys.path.insert(0, str(ARM_SCRIPT.parent))
    from sft_arm import peak_rss_mb  # the same measurement as the other arms
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qingzhou.data import DataConfig, prepare_data
    from qingzhou.finetune import finetune

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    data = prepare_data(DataConfig(source=str(DATA), max_length=args.max_length, eval_fraction=0, max_samples=args.rows,
                                   packing=True, cache=False), tok)
    stamps: list[float] = []
    cfg = {"method": method, "max_steps": args.steps, "batch_size": max(1, round(args.tokens_per_step / args.max_length)),
           "learning_rate": _lr(method), "progress": False, "save_every_minutes": 0, "warmup_ratio": 0.05}
    if method != "full":
        cfg.update({"r": 16, "alpha": 32, "dropout": LORA_DROPOUT})
    res = finetune(model, tok, data, cfg, output_dir=tempfile.mkdtemp(prefix="qz-bench-"),
                   callbacks=[lambda step, m: stamps.append(time.perf_counter())])
    per_step = res.train_tokens / args.steps  # packed rows: every token is real
    seconds = stamps[-1] - stamps[0]
    queue.put({"arm": "qingzhou", "method": method, "steps": len(stamps), "tokens_per_s": per_step * (len(stamps) - 1) / seconds,
               "tokens_per_step": per_step, "seconds_steps_2_to_n": seconds, "batch": cfg["batch_size"],
               "peak_mb": peak_rss_mb(), "loss_last": res.train_loss[-1][1]})


def run_qingzhou(args, method: str, folder: Path) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=arm_qingzhou, args=(args, method, str(folder), q))
    p.start()
    result = q.get()
    p.join()
    return result


def run_peer(arm: str, args, method: str, folder: Path, rows_file: Path) -> dict:
    python = PEER_PYTHON.get(arm, sys.executable)
    if not Path(python).is_file():
        return {"arm": arm, "method": method, "absent": f"no venv at {python}"}
    cmd = [python, str(ARM_SCRIPT), "--arm", arm, "--method", method, "--model-dir", str(folder),
           "--rows-file", str(rows_file), "--alpaca", str(DATA), "--rows", str(args.rows), "--steps", str(args.steps),
           "--max-length", str(args.max_length), "--tokens-per-step", str(args.tokens_per_step), "--lr", str(_lr(method)),
           "--dropout", str(LORA_DROPOUT), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"arm": arm, "method": method, "failed": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), tiny (2-layer Llama, real vocab), or a source")
    ap.add_argument("--methods", nargs="+", default=["lora"], help="lora full qlora")
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--tokens-per-step", type=int, default=1024, help="real tokens per optimizer step, every arm")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("QZ_BENCH_CACHE", "/tmp/qz-bench")))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.cache.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.model, args.cache)
    rows_file, mean_len = write_rows(folder, args.cache / f"{args.model}-rows-{args.max_length}.jsonl", args)
    results = []
    for method in args.methods:
        for arm in args.arms:
            r = run_qingzhou(args, method, folder) if arm == "qingzhou" else run_peer(arm, args, method, folder, rows_file)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "failed"}), "FAILED" if "failed" in r else "", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "mean_sample_tokens": mean_len,
                                         "results": results}, indent=2))
    print(f"\nmodel={args.model} max_length={args.max_length} tokens/step={args.tokens_per_step} steps={args.steps} "
          f"threads={args.threads} (mean sample {mean_len:.0f} tokens)")
    print("| method | arm | tok/s | peak MB | tok/step | qingzhou speed-up | qingzhou memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        rows = [r for r in results if r["method"] == method]
        qz = next((r for r in rows if r["arm"] == "qingzhou" and "tokens_per_s" in r), None)
        for r in rows:
            if "tokens_per_s" not in r:
                print(f"| {method} | {r['arm']} | {'absent' if 'absent' in r else 'failed'} | | | | |")
                continue
            up = f"{qz['tokens_per_s'] / r['tokens_per_s']:.2f}x" if qz else ""
            mem = f"{qz['peak_mb'] / r['peak_mb']:.2f}" if qz else ""
            print(f"| {method} | {r['arm']} | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | {r['tokens_per_step']:.0f} | {up} | {mem} |")
        peers = [r for r in rows if r["arm"] != "qingzhou" and r["arm"] != "hf_pad" and "tokens_per_s" in r]
        if qz and peers:
            best = max(peers, key=lambda r: r["tokens_per_s"])
            print(f"\n{method}: fastest baseline {best['arm']} {best['tokens_per_s']:.0f} tok/s; qingzhou "
                  f"{qz['tokens_per_s'] / best['tokens_per_s']:.2f}x at {qz['peak_mb'] / best['peak_mb']:.2f}x its peak memory "
                  f"(target: >= 1.30x at <= 1.00x)")


if __name__ == "__main__":
    main()
