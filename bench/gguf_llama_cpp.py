"""qingzhou's GGUF exports checked by llama.cpp itself: perplexity, tokenizer, llama-quantize.

For SmolLM2 (or any model `export_gguf` takes: Llama, Mistral, Qwen2, Gemma 3) and each GGUF type: export with qingzhou, run
llama.cpp's `llama-perplexity` on the first N WikiText-2 test chunks, and compute the same number
in qingzhou from the same file (loaded back through transformers' `gguf_file=` by
`qingzhou.llm.load_model`) with llama-perplexity's protocol: the text tokenized once (BOS first when
the vocabulary adds one), chunks of `ctx` tokens whose first token is replaced by BOS when the
vocabulary adds one, and only the second half of each chunk scored (`first = ctx/2`; the logits of
positions first..ctx-2 predict tokens first+1..ctx-1). The two must agree within 1% (llama.cpp
multiplies quantized weights with 8-bit-quantized activations, so not to the last digit). It also
reads back what llama.cpp's loader reports about the tokenizer (pre-tokenizer, BOS/EOS/PAD,
chat template) and checks the token ids llama.cpp's tokenizer gives equal ours, and quantizes our
f16 export with `llama-quantize` to Q4_K_M to compare its file (size, per-tensor types, bytes,
perplexity) with our own Q4_K_M.

llama.cpp is a peer, never a dependency: its tools are found in $QINGZHOU_LLAMA_CPP_BIN or the
llama-cpp-python sdist build below; functions return None / the script says so when absent.

    flock /tmp/heavy.lock python bench/gguf_llama_cpp.py --types f16,q8_0,q4_0,q4_k_m,q5_k_m,q6_k \
        --chunks 20 --ctx 512 --out /tmp/gguf_llama_cpp.json
It also quantizes the model's weights with our k-quant port and with ggml's own C quantizer (through
libggml-base) and reports the share of byte-identical blocks.
Functions other benches call (bench/interop.py): `llama_cpp_tool`, `llama_perplexity`, `llama_bench`,
`llama_quantize`, `llama_cpp_reads`, `llama_tokenize`, `llama_protocol_ppl`, `verify_gguf`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
WIKI = (SHARED if SHARED.exists() else Path("/work/shared/data")) / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_BIN = Path("/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin")


def llama_cpp_tool(name: str) -> Path | None:
    """Path of a llama.cpp tool (`llama-perplexity`, ...) or None when it is not built."""
    for folder in (os.environ.get("QINGZHOU_LLAMA_CPP_BIN"), DEFAULT_BIN):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _run(cmd: list[str], timeout: int = 3600) -> tuple[int, str, float]:
    start = time.perf_counter()
    # LLAMA_ARG_REPACK=0: no repacked/AMX weight buffers. A GGML_NATIVE build on an AMX CPU runs
    # q8_0 batches through AMX tiles, which this project's VM traps (SIGILL in
    # tinygemm_kernel_amx<block_q8_0>); the plain CPU kernels compute the same quantized products.
    env = {**os.environ, "LLAMA_ARG_REPACK": os.environ.get("LLAMA_ARG_REPACK", "0")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def llama_perplexity(gguf: str | Path, text_file: str | Path, *, ctx: int = 512, chunks: int = 20,
                     threads: int = 2) -> dict[str, Any] | None:
    """llama.cpp's perplexity of `gguf` on the first `chunks` chunks of `ctx` tokens of `text_file`.

    Returns {ppl, ppl_err, chunks, ctx, seconds, reads} (`reads`: what the loader reported, see
    `llama_cpp_reads`), or None when llama-perplexity is not built. Raises RuntimeError with the
    log's tail when llama.cpp refuses the file.
    """
    tool = llama_cpp_tool("llama-perplexity")
    if tool is None:
        return None
    rc, log, secs = _run([str(tool), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
                          "--chunks", str(chunks), "-t", str(threads), "-lv", "4"])  # -lv 4: the loader's KV dump
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if rc != 0 or not found:
        raise RuntimeError(f"llama-perplexity failed on {gguf} (rc {rc}):\n{log[-3000:]}")
    return {"ppl": float(found.group(1)), "ppl_err": float(found.group(2)), "chunks": chunks, "ctx": ctx,
            "seconds": round(secs, 1), "reads": llama_cpp_reads(log)}


def llama_cpp_reads(log: str) -> dict[str, Any]:
    """What llama.cpp's loader printed about a file: its KV pairs (`llama_model_loader: - kv`) for the
    tokenizer and file type, and the special tokens it resolved (`print_info: BOS token = 1 '...'`)."""
    kv = {}
    for key, value in re.findall(r"llama_model_loader: - kv\s+\d+:\s+(\S+)\s+\S+\s+= (.*)", log):
        kv[key] = value.strip()
    special = {m.group(1).lower(): int(m.group(2))
               for m in re.finditer(r"print_info: (BOS|EOS|EOT|PAD|UNK) token\s+= (\d+)", log)}
    types = dict(re.findall(r"llama_model_loader: - type\s+(\w+):\s+(\d+) tensors", log))
    file_type = re.search(r"print_info: file type\s+= (.*)", log)
    return {"pre": kv.get("tokenizer.ggml.pre"), "model": kv.get("tokenizer.ggml.model"),
            "chat_template": "tokenizer.chat_template" in kv, "special_ids": special,
            "tensor_types": {k: int(v) for k, v in types.items()},
            "file_type": file_type.group(1).strip() if file_type else None}


def llama_tokenize(gguf: str | Path, text_file: str | Path) -> list[int] | None:
    """Token ids llama.cpp's tokenizer gives the text (special tokens as the vocabulary adds them)."""
    tool = llama_cpp_tool("llama-tokenize")
    if tool is None:
        return None
    rc, log, _ = _run([str(tool), "-m", str(gguf), "-f", str(text_file), "--ids", "--log-disable", "--no-parse-special"])
    found = re.search(r"\[[0-9, ]*\]", log)
    if rc != 0 or not found:
        raise RuntimeError(f"llama-tokenize failed on {gguf} (rc {rc}):\n{log[-2000:]}")
    return json.loads(found.group(0))


def llama_quantize(src: str | Path, dst: str | Path, ftype: str = "Q4_K_M", *, threads: int = 2) -> dict[str, Any] | None:
    """`llama-quantize src dst ftype` (e.g. our f16 export -> Q4_K_M); None when not built."""
    tool = llama_cpp_tool("llama-quantize")
    if tool is None:
        return None
    rc, log, secs = _run([str(tool), str(src), str(dst), ftype, str(threads)])
    if rc != 0:
        raise RuntimeError(f"llama-quantize failed on {src} (rc {rc}):\n{log[-3000:]}")
    return {"path": str(dst), "bytes": Path(dst).stat().st_size, "seconds": round(secs, 1)}


def llama_bench(gguf: str | Path, *, threads: int = 2, n_gen: int = 64, n_prompt: int = 0,
                repetitions: int = 3) -> dict[str, Any] | None:
    """llama.cpp's own decode (tg) / prompt (pp) speed of `gguf` in tokens/s; None when not built."""
    tool = llama_cpp_tool("llama-bench")
    if tool is None:
        return None
    rc, log, _ = _run([str(tool), "-m", str(gguf), "-t", str(threads), "-n", str(n_gen), "-p", str(n_prompt),
                       "-r", str(repetitions), "-o", "json"])
    start = log.find("[")
    if rc != 0 or start < 0:
        raise RuntimeError(f"llama-bench failed on {gguf} (rc {rc}):\n{log[-2000:]}")
    rows = json.loads(log[start:log.rindex("]") + 1])
    return {"tokens_per_s": rows[-1]["avg_ts"], "stdev": rows[-1].get("stddev_ts"), "n_gen": n_gen,
            "n_prompt": n_prompt, "threads": threads}


def llama_protocol_ppl(model: Any, ids: list[int], *, ctx: int, chunks: int, bos_id: int | None) -> float:
    """llama-perplexity's number computed with `model` (a transformers causal LM) on token `ids`
    (already BOS-prefixed when the vocabulary adds BOS; pass its id as `bos_id` then, else None)."""
    import torch

    first, nll, count = ctx // 2, 0.0, 0
    with torch.inference_mode():
        for c in range(chunks):
            window = torch.tensor(ids[c * ctx:(c + 1) * ctx])
            targets = window[first + 1:].clone()
            if bos_id is not None:
                window[0] = bos_id
            logits = model(input_ids=window[None], use_cache=False).logits[0, first:ctx - 1].float()
            nll -= torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()
            count += ctx - first - 1
    return math.exp(nll / count)


def verify_gguf(gguf: str | Path, text_file: str | Path, *, ctx: int = 512, chunks: int = 20,
                threads: int = 2) -> dict[str, Any]:
    """llama.cpp's and qingzhou's perplexity of one GGUF file on the same tokens, side by side.

    qingzhou loads the file with `qingzhou.llm.load_model` (transformers' GGUF loader, dequantised
    fp32) and scores it with llama-perplexity's protocol (`llama_protocol_ppl`). Also compares the
    token ids of both tokenizers on the scored text, and what llama.cpp read about the tokenizer
    against the file's own keys. `llama_cpp` is None when llama.cpp is not built.
    """
    import gguf as gguf_pkg
    import torch

    from qingzhou.llm import load_model

    gguf, text_file = Path(gguf), Path(text_file)
    out: dict[str, Any] = {"file": str(gguf), "bytes": gguf.stat().st_size, "ctx": ctx, "chunks": chunks}
    ll = llama_perplexity(gguf, text_file, ctx=ctx, chunks=chunks, threads=threads)
    out["llama_cpp"] = ll
    torch.set_num_threads(threads)
    model, tok = load_model(str(gguf), dtype="float32", device="cpu")
    fields = {k: v.contents() for k, v in gguf_pkg.GGUFReader(str(gguf)).fields.items()
              if k.startswith("tokenizer.ggml.") and k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                               "tokenizer.ggml.token_type", "tokenizer.ggml.scores")}
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    text = text_file.read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False).input_ids[: ctx * chunks + 1]
    if add_bos:
        ids = [tok.bos_token_id, *ids]
    start = time.perf_counter()
    out["qingzhou"] = {"ppl": llama_protocol_ppl(model, ids, ctx=ctx, chunks=chunks,
                                                 bos_id=tok.bos_token_id if add_bos else None),
                       "seconds": round(time.perf_counter() - start, 1)}
    if ll is not None:
        out["rel_diff"] = out["qingzhou"]["ppl"] / ll["ppl"] - 1
        theirs = llama_tokenize(gguf, text_file)
        n = ctx * chunks
        out["same_token_ids"] = None if theirs is None else theirs[:n] == ids[:n]  # None: llama-tokenize not built
        reads = ll["reads"]
        out["tokenizer"] = {
            "pre": (reads["pre"], fields.get("tokenizer.ggml.pre")),
            "bos": (reads["special_ids"].get("bos"), fields.get("tokenizer.ggml.bos_token_id"), tok.bos_token_id),
            "eos": (reads["special_ids"].get("eos"), fields.get("tokenizer.ggml.eos_token_id"), tok.eos_token_id),
            "pad": (reads["special_ids"].get("pad"), fields.get("tokenizer.ggml.padding_token_id"), tok.pad_token_id),
            "chat_template": reads["chat_template"] == bool(tok.chat_template),  # present in the file iff the model has one
        }
        out["tokenizer_ok"] = (reads["pre"] == fields.get("tokenizer.ggml.pre")
                               and all(len(set(v)) == 1 for k, v in out["tokenizer"].items() if k in ("bos", "eos", "pad"))
                               and out["tokenizer"]["chat_template"])
    return out


def ggml_block_agreement(model: Any, kinds: tuple[str, ...] = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
                         max_blocks: int = 200_000) -> dict[str, Any] | None:
    """Our k-quant blocks against ggml's own quantizer (`ggml_quantize_chunk` from libggml-base, no
    importance matrix, as llama-quantize runs it) on the model's 2-D weights cut into 256-blocks:
    share of byte-identical blocks and our squared error over ggml's. None when ggml is not built."""
    import ctypes

    import gguf as gguf_pkg
    import numpy as np

    from qingzhou.compress.quantize.formats.kquants import BLOCK_BYTES, quantize_k

    lib_path = llama_cpp_tool("libggml-base.so")
    if lib_path is None:
        return None
    fn = ctypes.CDLL(str(lib_path)).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    blocks = np.concatenate([p.detach().float().reshape(-1, 256).numpy() for p in model.parameters()
                             if p.dim() == 2 and p.numel() % 256 == 0])[:max_blocks]
    blocks = np.ascontiguousarray(blocks, dtype=np.float32)
    out = {}
    for kind in kinds:
        ours = quantize_k(blocks, kind)
        ref = np.zeros_like(ours)
        fn(int(gguf_pkg.GGMLQuantizationType[kind]), blocks.ctypes.data, ref.ctypes.data, 0, blocks.shape[0], 256, None)
        t = gguf_pkg.GGMLQuantizationType[kind]
        e_ours = float(((gguf_pkg.quants.dequantize(ours, t) - blocks) ** 2).sum())
        e_ggml = float(((gguf_pkg.quants.dequantize(ref, t) - blocks) ** 2).sum())
        out[kind] = {"blocks": int(blocks.shape[0]), "identical_blocks": float((ours.reshape(-1, BLOCK_BYTES[kind]) ==
                                                                              ref.reshape(-1, BLOCK_BYTES[kind])).all(1).mean()),
                     "sq_err_ours_over_ggml": e_ours / e_ggml}
    return out


def compare_files(ours: str | Path, theirs: str | Path, source: str | Path) -> dict[str, Any]:
    """Tensor by tensor: same GGML type? identical bytes? error of each against `source` (the f16
    file both were quantised from, dequantised)."""
    import gguf as gguf_pkg
    import numpy as np
    from gguf.quants import dequantize

    a, b, s = (gguf_pkg.GGUFReader(str(p)) for p in (ours, theirs, source))
    tb, ts = {t.name: t for t in b.tensors}, {t.name: t for t in s.tensors}
    same_type = same_bytes = n = 0
    err_ours = err_theirs = 0.0
    types: dict[str, int] = {}
    for t in a.tensors:
        u, src = tb[t.name], ts[t.name]
        n += 1
        same_type += t.tensor_type == u.tensor_type
        types[f"{t.tensor_type.name}/{u.tensor_type.name}"] = types.get(f"{t.tensor_type.name}/{u.tensor_type.name}", 0) + 1
        same_bytes += t.tensor_type == u.tensor_type and np.array_equal(t.data, u.data)
        ref = dequantize(src.data, src.tensor_type).astype(np.float64)
        err_ours += float(((dequantize(t.data, t.tensor_type) - ref) ** 2).sum())
        err_theirs += float(((dequantize(u.data, u.tensor_type) - ref) ** 2).sum())
    return {"tensors": n, "same_type": same_type, "identical_bytes": same_bytes, "types_ours/llama": types,
            "sq_err_ours_over_llama": err_ours / err_theirs if err_theirs else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/gguf_llama_cpp")
    ap.add_argument("--no-llama-quantize", action="store_true", help="skip llama-quantize f16 -> Q4_K_M")
    ap.add_argument("--no-ggml-blocks", action="store_true", help="skip the block comparison with libggml")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from qingzhou.compress.quantize.formats.gguf import export_gguf
    from qingzhou.llm import load_model

    if llama_cpp_tool("llama-perplexity") is None:
        print("llama.cpp tools not found (set QINGZHOU_LLAMA_CPP_BIN); only qingzhou's side is measured.")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # the first ~chunks*ctx*8 characters are plenty of tokens; both tools read this same file
    text_file = work / "wiki_head.txt"
    text = WIKI.read_text(encoding="utf-8")
    text_file.write_text(text[: max(args.chunks * args.ctx * 8, 20000)], encoding="utf-8")
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    agreement = None if args.no_ggml_blocks else ggml_block_agreement(model)
    print(json.dumps({"k-quant blocks vs ggml_quantize_chunk": agreement}), flush=True)
    types = args.types.split(",")
    rows: dict[str, Any] = {}
    if not args.no_llama_quantize and "f16" not in types:  # llama-quantize's input only
        export_gguf(model, tok, work / "f16.gguf", "f16", overwrite=True)
    for q in types:
        path = work / f"{q}.gguf"
        start = time.perf_counter()
        info = export_gguf(model, tok, path, q, overwrite=True)
        rows[q] = {"export_s": round(time.perf_counter() - start, 1), "tensor_types": info["tensor_types"],
                   **verify_gguf(path, text_file, ctx=args.ctx, chunks=args.chunks, threads=args.threads)}
        print(json.dumps({q: rows[q]}, default=str), flush=True)
    if not args.no_llama_quantize and llama_cpp_tool("llama-quantize"):
        theirs = work / "llama_quantize_q4_k_m.gguf"
        q = llama_quantize(work / "f16.gguf", theirs, "Q4_K_M", threads=args.threads)
        # ours from the same f16-rounded weights, for a byte-level comparison
        f16_model, _ = load_model(str(work / "f16.gguf"), dtype="float32", device="cpu")
        export_gguf(f16_model, tok, work / "q4_k_m_from_f16.gguf", "q4_k_m", overwrite=True)
        rows["llama-quantize Q4_K_M (from our f16)"] = {
            "quantize_s": q["seconds"], **verify_gguf(theirs, text_file, ctx=args.ctx, chunks=args.chunks, threads=args.threads),
            "vs_ours_from_f16": compare_files(work / "q4_k_m_from_f16.gguf", theirs, work / "f16.gguf")}
        print(json.dumps({"llama-quantize": rows["llama-quantize Q4_K_M (from our f16)"]}, default=str), flush=True)
    print("\n| type | file MB | llama.cpp ppl | qingzhou ppl (same file, same tokens) | diff | tokenizer |")
    print("|---|---|---|---|---|---|")
    for q, r in rows.items():
        ll = r.get("llama_cpp") or {}
        print(f"| {q} | {r['bytes'] / 2**20:.1f} | {ll.get('ppl', float('nan')):.4f} | {r['qingzhou']['ppl']:.4f} | "
              f"{100 * r.get('rel_diff', float('nan')):+.2f}% | {'ok' if r.get('tokenizer_ok') else r.get('tokenizer')} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"ctx": args.ctx, "chunks": args.chunks, "model": args.model,
                                              "ggml_block_agreement": agreement, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
