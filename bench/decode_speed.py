"""Decode speed of qingzhou's generation path against plain eager `transformers.generate`, same run.

Prints batch-1 decode tokens/s for both (mean ± std over repetitions after warm-up), their ratio, and
whether the greedy outputs are identical. Issue 4's target for the fast path: >= 3x eager at batch 1
for a 1B Llama-shape model on an H100-class GPU, identical output; on CPU the ratio is ~1 (same path).
Then the full `qingzhou.eval.bench.bench` table (prefill / decode / TTFT / TPOT / memory / roofline).

    python bench/decode_speed.py --model smollm2 --new-tokens 64 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def eager_generate(model, ids, n: int):
    """The reference: plain transformers generate, dynamic cache, eager attention as loaded."""
    import torch

    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)


def qingzhou_generate(model, tokenizer, ids, n: int):
    """The project's path (`qingzhou.llm.generate`), fed the same prompt text."""
    from qingzhou.llm import generate

    text = tokenizer.decode(ids[0])
    return generate(model, tokenizer, text, max_new_tokens=n, chat=False)


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt", default="The history of the river begins in the mountains, where")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from qingzhou.eval.bench import _sync, bench
    from qingzhou.llm import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    device = str(next(model.parameters()).device)
    sync = _sync(device)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(device)
    n = args.new_tokens
    rates = {"eager": [], "qingzhou": []}
    with torch.inference_mode():
        ref = eager_generate(model, ids, n)[0, ids.shape[1]:]
        ours = qingzhou_generate(model, tok, ids, n)
        identical = tok.decode(ref, skip_special_tokens=True) == ours.text
        for i in range(args.warmup + args.repeats):
            t_eager = timed(lambda: eager_generate(model, ids, n), sync)
            t_ours = timed(lambda: qingzhou_generate(model, tok, ids, n), sync)
            if i >= args.warmup:
                rates["eager"].append(n / t_eager)
                rates["qingzhou"].append(n / t_ours)
    summary = {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None}
               for k, v in rates.items()}
    summary["ratio"] = summary["qingzhou"]["mean"] / summary["eager"]["mean"]
    summary["identical_greedy_output"] = identical
    summary["device"] = device
    full = bench(model, tok, batch_sizes=args.batch_sizes, new_tokens=n, warmup=args.warmup, repeats=args.repeats,
                 progress=False)
    if args.json:
        print(json.dumps({"decode_vs_eager": summary, "bench": full}, indent=2, default=str))
        return
    fmt = lambda s: f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["std"] is not None else "")  # noqa: E731
    print(f"device {device} ({full['env']['device_name']}), {n} new tokens, batch 1 end-to-end incl. prefill")
    print(f"eager generate   : {fmt(summary['eager'])} tok/s")
    print(f"qingzhou generate: {fmt(summary['qingzhou'])} tok/s  ratio {summary['ratio']:.2f}x  "
          f"identical output: {identical}")
    for r in full["results"]:
        print(f"batch {r['batch_size']:>3}: prefill {fmt(r['prefill_tokens_per_s'])} tok/s, decode "
              f"{fmt(r['decode_tokens_per_s'])} tok/s, TTFT {fmt(r['ttft_ms'])} ms, TPOT {fmt(r['tpot_ms'])} ms")
    print("memory:", full["memory"], "roofline:", full.get("roofline"))


if __name__ == "__main__":
    main()
