"""Batch-1 decode speed: eager `transformers.generate` against qingzhou's fast path, same run, same device.

The fast path (`qingzhou.llm.generate.decode`, `fast=True`) is a static KV cache plus `torch.compile` of
the decode step (CUDA graphs on CUDA). Both paths are timed the same way: after warm-up (which absorbs
the compile), `repeats` pairs of `generate(1 token)` and `generate(n tokens)`; decode time per token is
(t_n - t_1) / (n - 1), so the prefill never enters the decode figure. Prints mean ± std tokens/s of
each path, the ratio fast / eager, and whether the greedy tokens are identical.

Issue 4's target: ratio >= 3 at batch 1 for a 1B Llama-shape model on an H100-class GPU, identical
output. `--shape llama-1b` builds that shape with random weights (no download; greedy identity is
still a real check); `--model` takes any model qingzhou loads (default SmolLM2).

    python bench/decode_speed.py --model smollm2 --new-tokens 64 --repeats 3
    python bench/decode_speed.py --shape llama-1b --dtype bfloat16 --device cuda
    flock /tmp/heavy.lock python bench/decode_speed.py --device cpu --fast-backend inductor
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {  # TinyLlama-1.1B's shape: what "a 1B Llama-shape model" means in the issue
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}


def random_model(shape: str, dtype: str, device: str):
    """A random-weight Llama of a named shape and qingzhou's byte tokenizer (ids < 261 < vocab)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qingzhou.finetune.testing import byte_tokenizer
    from qingzhou.llm.devices import resolve_device

    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else torch.bfloat16
    dev = resolve_device(device)
    with torch.device(str(dev)):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).to(torch_dtype).eval()
    return model, byte_tokenizer()


def measure(model, ids, n: int, fast, warmup: int, repeats: int, sync) -> list[float]:
    """Decode tokens/s per repetition: n-token minus 1-token generate time, per token."""
    from qingzhou.llm.generate import decode

    def run(k: int) -> float:
        sync()
        start = time.perf_counter()
        decode(model, ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0, fast=fast)
        sync()
        return time.perf_counter() - start

    rates = []
    for i in range(warmup + repeats):
        t1, tn = run(1), run(n)
        if i >= warmup:
            rates.append((n - 1) / max(tn - t1, 1e-9))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of this shape instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt", default="The history of the river begins in the mountains, where")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fast-backend", default="inductor", help="torch.compile backend of the fast path")
    parser.add_argument("--fast-mode", default=None, help="compile mode (default: reduce-overhead on CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="fast path = static cache only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from qingzhou.eval.bench import _sync
    from qingzhou.llm import load_model
    from qingzhou.llm.devices import env_info
    from qingzhou.llm.generate import FastDecode, decode, fast_status

    if args.shape:
        model, tok = random_model(args.shape, args.dtype, args.device)
    else:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    device = str(next(model.parameters()).device)
    sync = _sync(device)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(device)
    fast = FastDecode(compile=not args.no_compile, backend=args.fast_backend, mode=args.fast_mode)
    n = args.new_tokens
    with torch.inference_mode():
        start = time.perf_counter()
        ours = decode(model, ids, max_new_tokens=n, do_sample=False, pad_token_id=0, fast=fast)
        first_fast_s = time.perf_counter() - start  # includes the compile
        ref = decode(model, ids, max_new_tokens=n, do_sample=False, pad_token_id=0, fast=False)
        identical = torch.equal(ref, ours)
        rates = {"eager": measure(model, ids, n, False, args.warmup, args.repeats, sync),
                 "fast": measure(model, ids, n, fast, args.warmup, args.repeats, sync)}
    summary = {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v)}
               for k, v in rates.items()}
    result = {
        "model": args.shape or args.model, "device": device, "device_name": env_info(device)["device_name"],
        "dtype": str(next(model.parameters()).dtype), "new_tokens": n, "prompt_tokens": int(ids.shape[1]),
        "decode_tokens_per_s": summary, "ratio": summary["fast"]["mean"] / summary["eager"]["mean"],
        "identical_greedy_output": identical, "fast_path": fast_status(model, fast),
        "first_fast_call_s": round(first_fast_s, 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    fmt = lambda s: f"{s['mean']:.1f} ± {s['std'] or 0:.1f}"  # noqa: E731
    print(f"{result['model']} on {device} ({result['device_name']}), {result['dtype']}, batch 1, "
          f"{result['prompt_tokens']} prompt + {n} new tokens")
    print(f"eager generate : {fmt(summary['eager'])} decode tok/s")
    print(f"fast ({result['fast_path']}): {fmt(summary['fast'])} decode tok/s")
    print(f"ratio fast/eager: {result['ratio']:.2f}x   identical greedy output: {identical}   "
          f"first fast call (compile): {result['first_fast_call_s']} s")


if __name__ == "__main__":
    main()
