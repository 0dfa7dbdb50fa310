"""Structured pruning + distillation on SmolLM2-135M: parameters, WikiText-2 perplexity and CPU decode
speed of the dense model, the structurally pruned model and the distilled student.

Protocol: perplexity as in `bench/prune_quality.py` (`"\\n\\n".join(rows)` of wiki.test.raw, 2048-token
windows, the first `--windows`); calibration for the pruning choice = the rows of
llamafactory/c4_demo.jsonl with >= 512 tokens, truncated to 512; distillation text =
llamafactory/wiki_demo.txt (Wikipedia articles; none of WikiText-2's test text), packed into
512-token rows, teacher = the dense model, top-64 logits cached once, forward KL at T=1, full
training of the pruned student. Target (issue 7): distillation wins back at least half of the
perplexity lost to pruning within the stated CPU budget (`--budget-min`, default 15 minutes for
the teacher cache + training on 2 cores).

Several pruning mixes of about the same size can be given (`--settings`, heads-mlp-layers as in
prune_quality.py); each is scored on `--scan-windows` windows and the one that loses least is
distilled.

    flock /tmp/heavy.lock python bench/structured_distill.py --out /tmp/sd.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prune_quality import SHARED, decode_speed, parse_setting  # noqa: E402  (same protocol, not a copy)


def count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def measure(model, tok, text, windows: int, decode: int, seq_len: int = 2048) -> dict:
    from qingzhou.eval.perplexity import perplexity

    res = perplexity(model, tok, text, seq_len=seq_len, max_windows=windows, progress=False)
    row = {"parameters": count(model), "ppl": round(res.ppl, 3), "ppl_s": round(res.seconds, 1)}
    if decode:
        row["decode_tok_s"] = round(decode_speed(model, tok, decode), 2)
    return row


def training_rows(tok, n_rows: int, max_length: int):
    """The first `n_rows` packed rows of wiki_demo.txt (plus a small held-out split)."""
    from qingzhou.data import DataConfig, prepare_data
    from qingzhou.data.prepare import PreparedData

    cfg = DataConfig(source=str(SHARED / "llamafactory" / "wiki_demo.txt"), format="text", packing=True,
                     max_length=max_length, eval_fraction=0.04, seed=0)
    data = prepare_data(cfg, tok)
    train = data.train[:n_rows]
    stats = {**data.stats, "train_samples": len(train), "train_tokens": sum(len(r) for r in train)}
    return PreparedData(train, data.eval, True, stats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="0-0.4167-0,0-0.3333-2,0.34-0.5833-0",
                    help="structured mixes heads-mlp-layers of about 25%% of the parameters (MLP widths kept at "
                         "multiples of 64: 896, 1024, 640 of 1536, so 4-bit group-64 quantization still applies)")
    ap.add_argument("--scan-windows", type=int, default=4, help="windows used to pick the setting")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-rows", type=int, default=100000)
    ap.add_argument("--train-rows", type=int, default=300, help="512-token rows of distillation text (1 epoch)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--kd-ratio", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--budget-min", type=float, default=15.0, help="stated CPU budget for distillation")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--freeze-embeddings", action="store_true",
                    help="keep the (tied) embeddings fixed: structured pruning leaves them intact, and skipping "
                         "their weight gradient and Adam step buys more distillation tokens per minute")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2", help="teacher (a tiny saved model for a smoke run)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reuse", default=None, help="a previous --out JSON: take its dense and pruned rows when the "
                                                  "windows and (single) setting match, so a distillation re-run "
                                                  "skips re-measuring them (pruning itself is deterministic)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from qingzhou.finetune.distill import distill
    from qingzhou.compress.prune.structured import structured_prune
    from qingzhou.data.corpus import load_text
    from qingzhou.llm import load_model

    text = load_text(str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    teacher, tok = load_model(args.model, dtype="float32", device="cpu")
    result: dict = {"protocol": {k: v for k, v in vars(args).items() if k != "out"}}

    def save() -> None:
        print(json.dumps(result, indent=1), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    old = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    same = bool(old) and old["protocol"]["windows"] == args.windows and old["protocol"]["decode"] == args.decode \
        and old.get("pruned", {}).get("setting") == args.settings
    result["dense"] = old["dense"] if same else measure(teacher, tok, text, args.windows, args.decode, args.seq_len)
    if same:
        result["reused"] = {"from": args.reuse, "rows": ["dense", "pruned"]}
    save()

    scan = []
    for setting in args.settings.split(","):
        cfg = parse_setting(f"structured-{setting}", args.calib_rows)
        cfg["device"] = "cpu"
        model = copy.deepcopy(teacher)
        t0 = time.perf_counter()
        structured_prune(model, cfg, tokenizer=tok)
        row = {"setting": setting, "prune_s": round(time.perf_counter() - t0, 1), "parameters": count(model),
               "param_ratio": round(count(model) / result["dense"]["parameters"], 4)}
        if len(args.settings.split(",")) > 1:  # a scan: pick the mix that loses least
            row["scan_ppl"] = round(measure(model, tok, text, args.scan_windows, 0, args.seq_len)["ppl"], 3)
        scan.append((row.get("scan_ppl", 0.0), row, model))
        result.setdefault("scan", []).append(row)
        print(json.dumps(row), flush=True)
    scan.sort(key=lambda x: x[0])
    _, best, student = scan[0]
    del scan
    result["pruned"] = old["pruned"] if same else \
        {"setting": best["setting"], **measure(student, tok, text, args.windows, args.decode, args.seq_len)}
    save()

    data = training_rows(tok, args.train_rows, args.max_length)
    steps = len(data.train) // (args.batch_size * args.grad_accum)
    cfg = {"divergence": "forward_kl", "temperature": args.temperature, "kd_ratio": args.kd_ratio,
           "top_k": args.top_k, "kl_rows": 8, "cache_dir": tempfile.mkdtemp(prefix="qz-teacher-"),
           "method": "full", "freeze_embeddings": args.freeze_embeddings, "learning_rate": args.lr, "max_steps": steps, "batch_size": args.batch_size,
           "grad_accum": args.grad_accum, "warmup_ratio": 0.05, "eval_batches": 4, "mixed_precision": "no",
           "progress": False}
    rep = distill(student, teacher, tok, cfg, data, output_dir=tempfile.mkdtemp(prefix="qz-distill-"))
    student = rep.model.eval()
    result["distill"] = {"seconds": round(rep.seconds, 1), "cache_s": round(rep.teacher.get("seconds", 0), 1),
                         "train_s": round(rep.finetune.seconds, 1), "steps": steps,
                         "train_tokens": rep.finetune.train_tokens, "kl_before": rep.kl_before,
                         "kl_after": rep.kl_after, "tokens_per_s": round(rep.finetune.tokens_per_s, 1),
                         "within_budget": rep.seconds <= args.budget_min * 60}
    result["distilled"] = measure(student, tok, text, args.windows, args.decode, args.seq_len)
    dense, pruned, distilled = result["dense"]["ppl"], result["pruned"]["ppl"], result["distilled"]["ppl"]
    result["recovered_fraction"] = round((pruned - distilled) / max(pruned - dense, 1e-9), 4)
    save()
    print(f"\n{'model':10s} {'params':>12s} {'ppl':>9s} {'decode tok/s':>13s}")
    for name in ("dense", "pruned", "distilled"):
        r = result[name]
        print(f"{name:10s} {r['parameters']:12,d} {r['ppl']:9.2f} {r.get('decode_tok_s', float('nan')):13.2f}")
    print(f"setting {best['setting']} (heads-mlp-layers); distillation {result['distill']['seconds']:.0f} s "
          f"(budget {args.budget_min:.0f} min) recovered {result['recovered_fraction']:.0%} of the perplexity lost")


if __name__ == "__main__":
    main()
