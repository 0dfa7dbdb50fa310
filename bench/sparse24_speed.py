"""2:4 sparse matmul and decode speed against dense, on a CUDA GPU (on CPU it says so and exits 0).

1. Per-shape matmul timings, y = x W^T with W 2:4-sparse: dense F.linear vs every 2:4 path of
   `qingzhou.compress.prune.sparse24` (cuSPARSELt / CUTLASS through torch's tensor subclass, and
   both kernels called directly), at 1 and 2048 rows, fp16 and bf16, for the MLP shapes of
   Llama-3.2-1B (8192x2048, 2048x8192) and Llama-3.1-8B (14336x4096, 4096x14336).
2. End to end: a random-weight Llama-3.2-1B-shaped model (16 layers by default), 2:4-pruned by
   magnitude, greedy decode tokens/s (batch 1, KV cache) and 2048-token prefill time: dense, then
   `sparsify_24` deciding per shape at 1 row (decode) and at 2048 rows, then each path forced.

    python bench/sparse24_speed.py [--dtypes bfloat16,float16] [--layers 16] [--new-tokens 128] [--out r.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHAPES = {  # (out_features, in_features) of the MLP projections
    "llama-3.2-1b gate/up": (8192, 2048), "llama-3.2-1b down": (2048, 8192),
    "llama-3.1-8b gate/up": (14336, 4096), "llama-3.1-8b down": (4096, 14336),
}
ROWS = [1, 2048]


def random_24_linear(out_f: int, in_f: int, dtype, device="cuda"):
    import torch

    from qingzhou.compress.prune.masks import nm_mask

    lin = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.masked_fill_(nm_mask(lin.weight.float().abs(), 2, 4), 0)
    return lin


def matmul_table(dtypes: list[str], iters: int) -> list[dict]:
    import torch

    from qingzhou.compress.prune.sparse24 import Sparse24Config, measure_paths

    cfg = Sparse24Config(rows=ROWS, iters=iters)
    rows = []
    for dtype in dtypes:
        for label, (out_f, in_f) in SHAPES.items():
            lin = random_24_linear(out_f, in_f, getattr(torch, dtype))
            measured = measure_paths(lin, cfg)
            for n, timings in measured["ms"].items():
                row = {"shape": label, "out": out_f, "in": in_f, "dtype": dtype, "rows": n,
                       "dense_ms": round(timings["dense"], 4)}
                for path in cfg.backends:
                    row[f"{path}_x"] = round(timings["dense"] / timings[path], 3) if path in timings else None
                rows.append(row)
                print(json.dumps({**row, "errors": measured["errors"]}), flush=True)
            del lin
    return rows


def llama_like(layers: int, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qingzhou.compress.prune.masks import nm_mask

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.masked_fill_(nm_mask(m.weight.float().abs(), 2, 4), 0)
    return model


def end_to_end(model, new_tokens: int) -> dict:
    import torch

    ids = torch.randint(100, 30000, (1, 32), device="cuda")
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    prefill = torch.randint(100, 30000, (1, 2048), device="cuda")
    with torch.inference_mode():
        for _ in range(2):  # the first generate of a process pays lazy CUDA/cuBLAS set-up (4x slower seen)
            model.generate(ids, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        decode = new_tokens / (time.perf_counter() - t0)
        model(prefill, use_cache=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            model(prefill, use_cache=False)
        torch.cuda.synchronize()
        prefill_ms = (time.perf_counter() - t0) / 5 * 1000
    return {"decode_tok_s": round(decode, 1), "prefill_2048_ms": round(prefill_ms, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-matmul", action="store_true", help="end to end only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: 2:4 semi-structured sparse kernels (cuSPARSELt / CUTLASS) need an NVIDIA GPU, "
              "Ampere (sm80) or newer. Nothing measured; `sparsify_24` leaves models dense on this machine.")
        return
    import torch.backends.cusparselt as cslt

    from qingzhou.compress.prune.sparse24 import BACKENDS, sparsify_24

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"cuSPARSELt {'available ' + str(cslt.version()) if cslt.is_available() else 'not available'}")
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "matmul": [] if args.skip_matmul else matmul_table(args.dtypes.split(","), args.iters),
                    "end_to_end": []}
    print(f"\n{'shape':22s} {'dtype':9s} {'rows':>5s} {'dense ms':>9s} " + " ".join(f"{p:>18s}" for p in BACKENDS)
          + "   (speed-up over dense, >1 = faster)")
    for r in result["matmul"]:
        cells = " ".join(f"{r[f'{p}_x']:18.2f}" if r[f"{p}_x"] is not None else f"{'failed':>18s}" for p in BACKENDS)
        print(f"{r['shape']:22s} {r['dtype']:9s} {r['rows']:5d} {r['dense_ms']:9.4f} {cells}")
    if not args.skip_e2e:
        dtype = getattr(torch, args.dtypes.split(",")[0])
        settings = [("dense", None), ("auto@1row", {"rows": [1]}), ("auto@2048rows", {"rows": [2048]})]
        settings += [(f"forced {p}", {"rows": [1], "backends": [p], "min_speedup": 0}) for p in BACKENDS]
        for label, cfg in settings:
            model = llama_like(args.layers, dtype)
            row: dict = {"setting": label}
            try:
                if cfg is not None:
                    report = sparsify_24(model, cfg)
                    row.update(converted=len(report.converted), left_dense=len(report.dense))
                row.update(end_to_end(model, args.new_tokens))
            except (RuntimeError, NotImplementedError, ValueError) as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            result["end_to_end"].append(row)
            print(json.dumps(row), flush=True)
            del model
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
