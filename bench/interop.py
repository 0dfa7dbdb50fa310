"""Where qingzhou's files run: every export of SmolLM2 loaded by its target tool, perplexity measured
by that tool and by qingzhou on the same WikiText-2 windows, and batch-1 decode tokens/s of each.

| export | tool (how it runs here) | qingzhou side |
|---|---|---|
| merged/dense HF folder | transformers `AutoModelForCausalLM` (in process) | `load_model(folder)` |
| peft LoRA adapter | peft `AutoPeftModelForCausalLM` (in process) | `load_model(adapter)` |
| GPTQ folder | GPTQModel 7.7 (bf16, its CPU torch kernel) and transformers' GPTQ integration (fp32), both in the GPTQModel venv (`bench/peers/gptq_load.py`) | `load_quantized(folder)` |
| compressed-tensors (W4A16 sym, W8A8, 2:4) | transformers + the `compressed-tensors` package (decompress on load, in process) | the model that was exported |
| GGUF (every type `export_gguf` supports) | llama.cpp's `llama-perplexity` / `llama-bench` (through `bench/gguf_llama_cpp.py`, same chunks on both sides) | `load_model(file.gguf)` |
| vLLM (GPTQ, compressed-tensors, LoRA) | not measured: needs a GPU (the config/tensor checks are tests/test_interop_*.py) | |

Perplexity: `qingzhou.eval.perplexity` windows (non-overlapping `--seq-len` tokens, BOS once at the
start) for every row except GGUF, where llama-perplexity's own protocol (second half of each
`--ctx` chunk scored) is computed on both sides. "agree" is |tool - qingzhou| / qingzhou <= 1%:
the same weights must give the same perplexity in every tool (bf16 compute rounds a little).
Decode tokens/s: greedy `generate` of `--new-tokens` after a 16-token prompt, batch 1, `--threads`
threads (llama.cpp: llama-bench `-p 0 -n`). Speed numbers are for a quiet machine only.

    python bench/interop.py --quick                        # smoke run: a few windows, q8_0 GGUF only
    flock /tmp/heavy.lock python bench/interop.py --threads 2 --out /tmp/interop.json   # the full table
Needs: /work/peers/gptqmodel (GPTQ rows, see bench/peers/README.md; $QZ_GPTQMODEL_PYTHON), the
`compressed-tensors` package importable (`pip install compressed-tensors`, dev extra), llama.cpp
tools ($QINGZHOU_LLAMA_CPP_BIN). Rows whose tool is absent say so instead of failing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = next((p for p in (Path(os.environ.get("QZ_SHARED_DATA", REPO.parent / "shared" / "data")),
                           Path("/work/shared/data")) if p.is_dir()), REPO.parent / "shared" / "data")
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"
PEER_PYTHON = Path(os.environ.get("QZ_GPTQMODEL_PYTHON", "/work/peers/gptqmodel/bin/python"))


def nll_on_windows(model, windows) -> tuple[float, int]:
    """Summed next-token NLL and token count over `windows` [N, T] (as qingzhou's perplexity sums)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            logits = model(input_ids=w[None]).logits.float()[0, :-1]
            total += float(F.cross_entropy(logits, w[1:], reduction="sum"))
            count += int(w.numel() - 1)
    return total, count


def decode_tok_s(model, prompt, new_tokens: int, qingzhou: bool = False) -> float | None:
    """Greedy decode tok/s: the tool's own `generate`, or qingzhou's runtime (`decode(fast="auto")`:
    the lean step and the C step where they apply) for qingzhou's rows."""
    import torch

    if not new_tokens:
        return None

    def run(n: int):
        if qingzhou:
            from qingzhou.llm.generate import decode

            return decode(model, prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, fast="auto")
        return model.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        run(2)
        t0 = time.perf_counter()
        run(new_tokens)
        return new_tokens / (time.perf_counter() - t0)


def row(export: str, tool: str, *, tool_ppl=None, ours_ppl=None, tool_tok_s=None, ours_tok_s=None,
        loads: bool | None = True, note: str = "") -> dict:
    rel = abs(tool_ppl - ours_ppl) / ours_ppl if tool_ppl and ours_ppl else None
    return {"export": export, "tool": tool, "loads": loads, "tool_ppl": tool_ppl, "qingzhou_ppl": ours_ppl,
            "rel_diff": rel, "agree": None if rel is None else rel <= 0.01, "tool_tok_s": tool_tok_s,
            "qingzhou_tok_s": ours_tok_s, "note": note}


class Bench:
    def __init__(self, args):
        import torch

        from qingzhou.eval.perplexity import tokenize_windows
        from qingzhou.llm import load_model

        self.args = args
        torch.set_num_threads(args.threads)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="qz_interop_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.model, self.tok = load_model(args.model, dtype="float32", device="cpu")
        text = WIKI.read_text(encoding="utf-8")[: args.seq_len * args.windows * 8]
        self.windows = tokenize_windows(self.tok, text, args.seq_len, args.windows)
        self.prompt = self.windows[:1, :16]
        self.rows: list[dict] = []

    def ppl(self, model) -> float:
        s, n = nll_on_windows(model, self.windows)
        return math.exp(s / n)

    def ours(self, model) -> tuple[float, float | None]:
        return self.ppl(model), decode_tok_s(model, self.prompt, self.args.new_tokens, qingzhou=True)

    def fresh(self):
        import copy

        return copy.deepcopy(self.model)  # loading the GGUF again costs ~30 s on a busy CPU

    def guard(self, export: str, tool: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # one broken row must not hide the others
            self.rows.append(row(export, tool, loads=False, note=f"{type(e).__name__}: {e}"[:300]))
            traceback.print_exc()

    # --- rows -----------------------------------------------------------------------------------
    def dense(self) -> None:
        from transformers import AutoModelForCausalLM

        from qingzhou.llm import load_model, save_model

        folder = self.work / "dense"
        save_model(self.model, self.tok, folder, overwrite=True)
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32").eval()
        ours, _ = load_model(str(folder), dtype="float32", device="cpu")
        o_ppl, o_speed = self.ours(ours)
        self.rows.append(row("dense HF folder", "transformers", tool_ppl=self.ppl(hf), ours_ppl=o_ppl,
                             tool_tok_s=decode_tok_s(hf, self.prompt, self.args.new_tokens), ours_tok_s=o_speed))

    def adapter(self) -> None:
        from peft import AutoPeftModelForCausalLM

        from qingzhou.finetune import finetune
        from qingzhou.llm import load_model

        base = self.work / "dense"  # written by dense(): a base peft can open
        model, tok = load_model(str(base), dtype="float32", device="cpu")
        rows = [{"text": line[:300]} for line in WIKI.read_text(encoding="utf-8").splitlines()[1:200] if len(line) > 40][:8]
        finetune(model, tok, rows, {"method": "lora", "r": 8, "max_steps": 2, "batch_size": 2,
                                    "learning_rate": 1e-3, "progress": False},
                 output_dir=self.work / "ft", base_source=str(base), overwrite=True)
        adapter = self.work / "ft" / "adapter"
        peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
        ours, _ = load_model(str(adapter), dtype="float32", device="cpu")
        o_ppl, o_speed = self.ours(ours)
        self.rows.append(row("peft LoRA adapter", "peft AutoPeftModelForCausalLM", tool_ppl=self.ppl(peft_model),
                             ours_ppl=o_ppl, tool_tok_s=decode_tok_s(peft_model, self.prompt, self.args.new_tokens),
                             ours_tok_s=o_speed))

    def gptq(self) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        from qingzhou.compress.quantize import load_quantized, quantize, save_quantized

        base = {"method": self.args.gptq_method, "bits": 4, "group_size": 64, "clip_search": not self.args.quick}
        cases = {"GPTQ 4-bit g64 asym (gptq_v2)": base, "GPTQ 4-bit g64 sym (gptq)": {**base, "sym": True}}
        ours = {}
        for i, (name, cfg) in enumerate(cases.items()):
            m = self.fresh()
            if cfg["method"] != "rtn":
                cfg = {**cfg, "calibration": {"num_samples": self.args.calib, "seq_len": 256}}
            quantize(m, cfg, tokenizer=self.tok)
            save_quantized(m, self.tok, self.work / f"gptq{i}", overwrite=True)
            ours[name] = self.ours(load_quantized(self.work / f"gptq{i}"))
        if not PEER_PYTHON.exists():
            for name, (p, s) in ours.items():
                self.rows.append(row(name, "GPTQModel / transformers", loads=None, ours_ppl=p, ours_tok_s=s,
                                     note=f"GPTQModel venv absent ({PEER_PYTHON})"))
            return
        save_file({"ids": self.prompt.clone(), "windows": self.windows.clone()}, str(self.work / "ids.safetensors"))
        cmd = [str(PEER_PYTHON), str(HERE / "peers" / "gptq_load.py"), "--inputs", str(self.work / "ids.safetensors"),
               "--out", str(self.work / "gptq_peer.safetensors"), "--threads", str(self.args.threads),
               "--decode-tokens", str(self.args.new_tokens)]
        for i in range(len(cases)):
            cmd += ["--folder", f"c{i}={self.work / f'gptq{i}'}"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        print(f"[gptq peers] {time.perf_counter() - t0:.0f}s rc={done.returncode}", file=sys.stderr)
        info = json.loads((self.work / "gptq_peer.safetensors.json").read_text())
        tensors = load_file(str(self.work / "gptq_peer.safetensors"))
        for i, name in enumerate(cases):
            o_ppl, o_speed = ours[name]
            for loader, r in info["cases"][f"c{i}"].items():
                tool = f"{'GPTQModel' if loader == 'gptqmodel' else 'transformers GPTQ'} ({r['dtype']}, {','.join(r.get('kernels') or [])})"
                if not r["ok"]:
                    self.rows.append(row(name, tool, loads=False, ours_ppl=o_ppl, ours_tok_s=o_speed, note=r["error"][:300]))
                    continue
                key = f"c{i}.{loader}"
                t_ppl = math.exp(float(tensors[f"{key}.nll_sum"]) / int(tensors[f"{key}.tokens"]))
                self.rows.append(row(name, tool, tool_ppl=t_ppl, ours_ppl=o_ppl, tool_tok_s=r.get("decode_tok_s"),
                                     ours_tok_s=o_speed))
        del torch

    def compressed_tensors(self) -> None:
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            self.rows.append(row("compressed-tensors", "transformers + compressed-tensors", loads=None,
                                 note="compressed-tensors not installed (pip install compressed-tensors)"))
            return
        from transformers import AutoModelForCausalLM

        from qingzhou.compress.prune import prune
        from qingzhou.compress.quantize import quantize
        from qingzhou.compress.quantize.api import save_compressed

        calib = {"calibration": {"num_samples": self.args.calib, "seq_len": 256}}
        cases = {
            "compressed-tensors W4A16 g64 sym (pack-quantized)": lambda m: quantize(
                m, {"method": "rtn", "bits": 4, "group_size": 64, "sym": True, "clip_search": not self.args.quick},
                tokenizer=self.tok),
            "compressed-tensors W8A8 SmoothQuant (int-quantized)": lambda m: quantize(
                m, {"method": "smoothquant", **calib}, tokenizer=self.tok),
            "compressed-tensors 2:4 magnitude (dense + sparsity_config)": lambda m: prune(
                m, {"method": "magnitude", "nm": "2:4"}),
        }
        for i, (name, apply) in enumerate(cases.items()):
            def one(name=name, apply=apply, i=i):
                m = self.fresh()
                apply(m)
                save_compressed(m, self.tok, self.work / f"ct{i}", "compressed-tensors", overwrite=True)
                hf = AutoModelForCausalLM.from_pretrained(str(self.work / f"ct{i}"), dtype="float32").eval()
                o_ppl, o_speed = self.ours(m)
                note = ("compressed-tensors simulates per-token int8 activations with scale amax/127.5 "
                        "(qingzhou and vLLM: amax/127)" if "W8A8" in name else
                        "exported tensors are 16-bit; qingzhou measured the fp32 model in memory" if "2:4" in name else "")
                self.rows.append(row(name, "transformers + compressed-tensors (decompress)", tool_ppl=self.ppl(hf),
                                     ours_ppl=o_ppl, tool_tok_s=decode_tok_s(hf, self.prompt, self.args.new_tokens),
                                     ours_tok_s=o_speed, note=note))
            self.guard(name, "transformers + compressed-tensors", one)

    def gguf(self) -> None:
        from typing import get_args

        from qingzhou.compress.quantize.formats import gguf as gguf_mod

        sys.path.insert(0, str(HERE))
        try:
            import gguf_llama_cpp as lc  # bench/gguf_llama_cpp.py (the GGUF helper's verification code)
        except ImportError:
            lc = None
        types = [t for t in get_args(getattr(gguf_mod, "GGUFType", None) or ()) if t in self.args.gguf_types] \
            or [t for t in ("f32", "q8_0", "q4_0") if t in self.args.gguf_types]
        if lc is None:
            self.rows.append(row("GGUF", "llama.cpp", loads=None, note="bench/gguf_llama_cpp.py absent on this branch"))
            return
        text_file = self.work / "wiki_head.txt"
        text_file.write_text(WIKI.read_text(encoding="utf-8")[: max(self.args.chunks * self.args.ctx * 8, 20000)])
        for t in types:
            def one(t=t):
                path = self.work / f"m_{t}.gguf"
                gguf_mod.export_gguf(self.model, self.tok, path, t, overwrite=True)
                v = lc.verify_gguf(str(path), str(text_file), ctx=self.args.ctx, chunks=self.args.chunks,
                                   threads=self.args.threads)
                if v is None:
                    self.rows.append(row(f"GGUF {t}", "llama.cpp", loads=None, note="llama.cpp tools not built"))
                    return
                sp = lc.llama_bench(str(path), threads=self.args.threads, n_gen=self.args.new_tokens or 16) \
                    if self.args.new_tokens else None
                ours_speed = None
                if self.args.new_tokens:
                    from qingzhou.llm import load_model

                    ours_speed = decode_tok_s(load_model(str(path), dtype="float32", device="cpu")[0], self.prompt,
                                              self.args.new_tokens, qingzhou=True)
                self.rows.append(row(f"GGUF {t}", "llama.cpp (llama-perplexity, llama-bench)",
                                     tool_ppl=v["llama_cpp"]["ppl"], ours_ppl=v["qingzhou"]["ppl"],
                                     tool_tok_s=(sp or {}).get("tokens_per_s"), ours_tok_s=ours_speed,
                                     note=f"same token ids: {v.get('same_token_ids')}; llama-perplexity protocol"))
            self.guard(f"GGUF {t}", "llama.cpp", one)

    def vllm(self) -> None:
        self.rows.append(row("GPTQ / compressed-tensors / LoRA", "vLLM", loads=None,
                             note="unmeasured: no GPU lent; loader fields checked by tests/test_interop_*.py"))


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    out = ["| export | tool | loads | ppl (tool) | ppl (qingzhou) | diff | agree <=1% | tok/s (tool) | tok/s (qingzhou) | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loads = {True: "yes", False: "**no**", None: "n/a"}[r["loads"]]
        agree = {True: "yes", False: "**no**", None: ""}[r["agree"]]
        out.append(f"| {r['export']} | {r['tool']} | {loads} | {f(r['tool_ppl'], '.3f')} | {f(r['qingzhou_ppl'], '.3f')} | "
                   f"{f(r['rel_diff'] and 100 * r['rel_diff'], '.3f')}{'%' if r['rel_diff'] is not None else ''} | {agree} | "
                   f"{f(r['tool_tok_s'], '.1f')} | {f(r['qingzhou_tok_s'], '.1f')} | {r['note']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 windows of 128, 8 new tokens, RTN without "
                    "clip search, q8_0 GGUF, no adapter training")
    ap.add_argument("--rows", default="dense,adapter,gptq,compressed_tensors,gguf,vllm")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity chunk size (GGUF rows)")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--gguf-types", default="f32,f16,bf16,q8_0,q4_0,q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--gptq-method", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--calib", type=int, default=32, help="calibration samples (GPTQ, SmoothQuant)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the exports (default: a temp folder)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len, args.windows, args.ctx, args.chunks = 128, 2, 128, 2
        args.new_tokens, args.calib, args.gptq_method, args.gguf_types = 8, 4, "rtn", "q8_0"
        args.rows = ",".join(r for r in args.rows.split(",") if r != "adapter")
    args.gguf_types = set(args.gguf_types.split(","))
    bench = Bench(args)
    for name in args.rows.split(","):
        t0 = time.perf_counter()
        bench.guard(name, "-", getattr(bench, name))
        print(f"[{name}] {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print(table(bench.rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": {k: sorted(v) if isinstance(v, set) else v
                                                       for k, v in vars(args).items()}, "rows": bench.rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
