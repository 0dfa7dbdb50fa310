"""The CPU routes of a 4-bit layer and of the fast head, timed on this machine (the figures in
`qingzhou/llm/quantized/int4_kernel.py` and `runtime.py` come from it).

A 4-bit layer on CPU runs torch's int4 kernel up to `CPU_KERNEL_MAX_ROWS` rows and a dequantise +
GEMM route above; the GEMM is bf16 where the CPU has a fast bf16 GEMM (AVX-512/AMX) and fp32 where
it has not (plain AVX2). This prints, per row count and SmolLM2 layer shape, the kernel, both GEMM
routes and a cached dense fp32 weight (the baseline a 4-bit model competes with), so the rule can
be checked on any CPU; and the head's int8 / fp32 / bf16 routes. Times: best of a few repeats, ms.

    python bench/cpu_routes.py                 # one thread
    python bench/cpu_routes.py --threads 2 --rows 1,256,2048
"""
from __future__ import annotations

import argparse
import time

import torch


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def layer_rows(in_f: int, out_f: int, rows: list[int], group: int = 64) -> list[dict]:
    from qingzhou.llm.quantized.int4_kernel import Int4Pack

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, generator=g)
    scales = (torch.rand(in_f // group, out_f, generator=g) * 0.01 + 1e-3).half()
    zeros = torch.randint(1, 15, (in_f // group, out_f), dtype=torch.int32, generator=g)
    pack = Int4Pack.build(codes, scales, zeros, torch.arange(in_f) // group, group, torch.device("cpu"),
                          torch.float32, force=True)
    if pack is None:
        raise SystemExit("torch's int4 CPU kernel does not run here")
    dense = pack.dequantize(torch.float32)
    out = []
    for n in rows:
        x = torch.randn(n, in_f)
        xb = x.bfloat16()
        reps = 10 if n <= 64 else 3
        out.append({"shape": f"{in_f}->{out_f}", "rows": n,
                    "int4 kernel": best_ms(lambda xb=xb: pack.matmul(xb, pack.packed, group, pack.scales_and_zeros), reps),
                    "dequant+GEMM bf16": best_ms(lambda xb=xb: xb @ pack.dequantize(torch.bfloat16).T, reps),
                    "dequant+GEMM fp32": best_ms(lambda x=x: x @ pack.dequantize(torch.float32).T, reps),
                    "dense fp32 (cached)": best_ms(lambda x=x: x @ dense.T, reps)})
    return out


def head_rows(in_f: int, vocab: int, rows: list[int]) -> list[dict]:
    from qingzhou.llm.quantized.runtime import _int8_matmul, _int8_rows

    w = torch.randn(vocab, in_f)
    codes, scale = _int8_rows(w)
    wb = w.bfloat16()
    out = []
    for n in rows:
        x = torch.randn(n, in_f)
        reps = 3 if n <= 64 else 1
        out.append({"shape": f"head {in_f}->{vocab}", "rows": n,
                    "int8": best_ms(lambda x=x: _int8_matmul(x.bfloat16(), codes, scale), reps),
                    "bf16": best_ms(lambda x=x: x.bfloat16() @ wb.T, reps),
                    "fp32": best_ms(lambda x=x: x @ w.T, reps)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,4,16,64,256,2048")
    ap.add_argument("--head-rows", default="1,4,64,2048")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from qingzhou.llm.quantized.int4_kernel import CPU_KERNEL_MAX_ROWS, cpu_bf16_gemm_fast, cpu_gemm_dtype

    rows = [int(r) for r in args.rows.split(",")]
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, fast bf16 GEMM: {cpu_bf16_gemm_fast()}, "
          f"many-rows route: {cpu_gemm_dtype()} above {CPU_KERNEL_MAX_ROWS} rows; {args.threads} thread(s)")
    for table in ([r for shape in ((576, 1536), (1536, 576)) for r in layer_rows(*shape, rows)],
                  head_rows(576, 49152, [int(r) for r in args.head_rows.split(",")])):
        keys = list(table[0])
        print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in table:
            print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
