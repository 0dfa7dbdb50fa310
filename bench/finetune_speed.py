"""qingzhou's training loop vs a plain Hugging Face `Trainer` + peft baseline: tokens/s and peak memory.

Same model, data (alpaca rows), method, max length and batch size for both. qingzhou packs rows
(no padding compute) and normalises the loss per token; the baseline pads each batch
(DataCollatorForSeq2Seq), as a default Trainer SFT script does. tokens/s counts real (non-pad)
tokens. Each arm runs in its own child process so CPU peak RSS is per arm (GPU: max allocated).
QLoRA (NF4 + double quantisation, LoRA r=16) runs where bitsandbytes does (CUDA; CPU from 0.46):
qingzhou swaps the loaded model's linears in memory, the baseline reloads through transformers'
`BitsAndBytesConfig`, the usual HF recipe; both quantise the same layers the same way.

Real tokens per step are printed for both arms: packed rows of `--max-length` carry several short
samples, so at the same batch size qingzhou trains on more tokens (and holds more activations) per
step than the padded baseline; `--qz-batch-size` evens that out.

    python bench/finetune_speed.py                       # tiny 4-layer Llama, CPU-friendly
    python bench/finetune_speed.py --model smollm2 --steps 20 --methods lora full qlora
    python bench/finetune_speed.py --model smollm2 --batch-size 2 --qz-batch-size 1   # ~equal tokens per step
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory" / "alpaca_en_demo.json"


def _load(name: str):
    import torch

    if name == "tiny":
        from qingzhou.finetune.testing import byte_tokenizer, tiny_model

        tok = byte_tokenizer()
        model = tiny_model("llama", num_hidden_layers=4, hidden_size=256, intermediate_size=688,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
        return model, tok
    from qingzhou.llm import load_model

    return load_model(name, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu")


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _examples(tok, args):
    from qingzhou.data import DataConfig, prepare_data

    cfg = DataConfig(source=str(DATA), max_length=args.max_length, eval_fraction=0, max_samples=args.rows, cache=False)
    return prepare_data(cfg, tok), cfg


def arm_qingzhou(args, method: str, queue) -> None:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from qingzhou.data import DataConfig, prepare_data
    from qingzhou.finetune import finetune

    model, tok = _load(args.model)
    cfg = DataConfig(source=str(DATA), max_length=args.max_length, eval_fraction=0, max_samples=args.rows,
                     packing=True, cache=False)
    data = prepare_data(cfg, tok)
    cfg = {"method": method, "max_steps": args.steps, "batch_size": args.qz_batch_size or args.batch_size,
           "learning_rate": _lr(method), "progress": False}
    if method != "full":
        cfg["r"] = 16
    res = finetune(model, tok, data, cfg, output_dir=tempfile.mkdtemp(prefix="qz-bench-"))
    queue.put({"arm": "qingzhou", "method": method, "tokens_per_s": res.tokens_per_s, "peak_mb": _peak_mb(),
               "seconds": res.seconds, "tokens": res.train_tokens, "loss_last": res.train_loss[-1][1],
               "tokens_per_step": res.train_tokens / args.steps})


def _lr(method: str) -> float:
    return 1e-5 if method == "full" else 1e-4


def _hf_4bit(model):
    """The usual HF QLoRA recipe: reload through `from_pretrained(quantization_config=
    BitsAndBytesConfig(nf4, double quant))`, then peft's k-bit preparation (no checkpointing,
    like the qingzhou arm)."""
    import tempfile

    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    folder = tempfile.mkdtemp(prefix="hf-bench-base-")
    model.save_pretrained(folder)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, device_map={"": "cuda" if cuda else "cpu"})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _default_methods() -> list[str]:
    """LoRA and full always; QLoRA where bitsandbytes runs (CUDA, or CPU with bitsandbytes >= 0.46)."""
    import torch

    from qingzhou.llm.devices import capabilities

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ["lora", "full", *(["qlora"] if capabilities(device).bitsandbytes else [])]


def arm_trainer(args, method: str, queue) -> None:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from qingzhou.finetune.methods import LoraConfig, target_modules_for

    model, tok = _load(args.model)
    data, _ = _examples(tok, args)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in data.train]
    if method == "qlora":
        model = _hf_4bit(model)
    if method != "full":
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                           lora_dropout=LoraConfig().dropout,  # as the qingzhou arm
                                                           target_modules=target_modules_for(model)))
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="hf-bench-"), per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps, learning_rate=_lr(method), report_to=[],
                              save_strategy="no", logging_steps=args.steps, disable_tqdm=True,
                              use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), dataloader_num_workers=0)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
    tokens = mean_len * args.batch_size * args.steps
    queue.put({"arm": "hf_trainer", "method": method, "tokens_per_s": tokens / seconds, "peak_mb": _peak_mb(),
               "seconds": seconds, "tokens": tokens, "loss_last": out.training_loss, "tokens_per_step": tokens / args.steps})


def run_arm(fn, args, method):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(args, method, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="tiny (in-process 4-layer Llama) or a qingzhou model source")
    ap.add_argument("--methods", nargs="+", default=None, help="default: lora full qlora (qlora where bitsandbytes runs)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--qz-batch-size", type=int, default=None,
                    help="packed rows per step for qingzhou (default: --batch-size). A packed row holds several "
                         "samples, so with short samples the same batch size means more tokens per step than "
                         "the padded baseline; this evens out the work per step (both are printed)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    for method in args.methods or _default_methods():
        hf = run_arm(arm_trainer, args, method)
        qz = run_arm(arm_qingzhou, args, method)
        results.append({"method": method, "hf": hf, "qingzhou": qz,
                        "speedup": qz["tokens_per_s"] / hf["tokens_per_s"], "memory_ratio": qz["peak_mb"] / hf["peak_mb"]})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"model={args.model} max_length={args.max_length} batch={args.batch_size} steps={args.steps} threads={args.threads}")
    print(f"{'method':8} {'HF tok/s':>10} {'qz tok/s':>10} {'speedup':>8} {'HF MB':>8} {'qz MB':>8} {'mem ratio':>9}"
          f" {'HF tok/step':>11} {'qz tok/step':>11}")
    for r in results:
        print(f"{r['method']:8} {r['hf']['tokens_per_s']:10.0f} {r['qingzhou']['tokens_per_s']:10.0f} {r['speedup']:8.2f} "
              f"{r['hf']['peak_mb']:8.0f} {r['qingzhou']['peak_mb']:8.0f} {r['memory_ratio']:9.2f}"
              f" {r['hf']['tokens_per_step']:11.0f} {r['qingzhou']['tokens_per_step']:11.0f}")


if __name__ == "__main__":
    main()
