"""MoEfication quality on SmolLM2-135M: WikiText-2 perplexity against the fraction of FFN compute kept.

Protocol (as bench/prune_quality.py): `"\\n\\n".join(rows)` of wiki.test.raw, 2048-token windows,
the first `--windows` windows; calibration = the rows of llamafactory/c4_demo.jsonl with >= 512
tokens, truncated to 512; fp32 on CPU. For each router, the model is moefied once with k experts
per FFN, then evaluated with e = k, k/2, k/4 experts per token (e = k is exactly the dense model,
a check that the expert path is right). The summary line gives the routers' recall of the true
top-k/2 experts on the calibration tokens. `--decode 64` adds batch-1 greedy decode tokens/s for each e.

    python bench/moefy_quality.py --experts 8 --windows 20 --routers centroid,trained
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", default=None, help="comma-separated e values (default k, k/2, k/4)")
    ap.add_argument("--routers", default="centroid,trained")
    ap.add_argument("--cluster-on", default="activations", choices=["activations", "weights"])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--calib-rows", type=int, default=100000, help="at most this many calibration rows (all 82)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="calibration tokens kept per layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=0, help="also time greedy decoding of this many tokens per e")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from prune_quality import decode_speed  # same directory: one decode timer for every bench

    from qingzhou.compress.moefy import moefy, set_top_k
    from qingzhou.llm import load_model

    dense, tok = load_model("smollm2", dtype="float32", device="cpu")
    top_k = [int(e) for e in args.top_k.split(",")] if args.top_k else None
    rows = []
    for router in args.routers.split(","):
        model = copy.deepcopy(dense)
        cfg = {"num_experts": args.experts, "top_k": max(1, args.experts // 2), "router": router, "cluster_on": args.cluster_on,
               "max_tokens": args.max_tokens, "device": "cpu",
               "calibration": {"source": str(SHARED / "llamafactory" / "c4_demo.jsonl"), "mode": "rows",
                               "seq_len": 512, "num_samples": args.calib_rows},
               "evaluate": {"text": str(SHARED / "wikitext-2-raw" / "wiki.test.raw"), "seq_len": 2048,
                            "max_windows": args.windows, "top_k": top_k}}
        t0 = time.perf_counter()
        report = moefy(model, cfg, tokenizer=tok)
        summary = report.summary()
        for q in report.quality:
            row = {"router": router, "cluster_on": args.cluster_on, **q, "moefy_s": round(report.seconds, 1),
                   "router_overhead": round(report.router_flops_ratio, 4)}
            if args.decode:
                set_top_k(model, q["top_k"])
                row["decode_tok_s"] = round(decode_speed(model, tok, args.decode), 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(json.dumps({"router": router, "summary": summary, "seconds": round(time.perf_counter() - t0, 1)}),
              flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"windows": args.windows, "rows": rows}, indent=2))
        del model
    print(f"\nSmolLM2-135M, WikiText-2, {args.windows} x 2048 tokens, k={args.experts}, cluster_on={args.cluster_on}")
    print(f"{'router':9s} {'e':>3s} {'FFN kept':>9s} {'ppl':>9s}" + (f" {'decode tok/s':>13s}" if args.decode else ""))
    for r in rows:
        line = f"{r['router']:9s} {r['top_k']:3d} {r['ffn_compute_kept']:9.3f} {r['ppl']:9.2f}"
        print(line + (f" {r['decode_tok_s']:13.2f}" if args.decode else ""))


if __name__ == "__main__":
    main()
