"""Pruning quality on SmolLM2-135M: WikiText-2 test perplexity, dense vs magnitude / Wanda / SparseGPT
at 50% unstructured and 2:4 (and optionally structured pruning).

Protocol (the issue's): `"\\n\\n".join(rows)` of wiki.test.raw, 2048-token windows, the first
`--windows` windows (issue: 40); calibration = the rows of llamafactory/c4_demo.jsonl with >= 512
tokens, truncated to 512 (82 rows; `--calib-rows` takes fewer for a quick CPU run), fp32. Every
setting starts from a copy of the same dense model. Reference numbers that the issue author
measured with llm-compressor 0.14 under the same protocol (40 windows, 82 rows) are printed next to
ours; they were not re-run here (llm-compressor is not installed), so compare only at equal
windows/calibration.

    python bench/prune_quality.py                                   # all settings, 40 windows
    python bench/prune_quality.py --windows 20 --settings dense,wanda-50,sparsegpt-2:4 --out /tmp/p.json
Setting names: dense | {magnitude,wanda,sparsegpt}-{50|2:4|4:8|<percent>}[-noseq] | structured-<heads>-<mlp>-<layers>
(`-noseq`: one calibration pass per layer instead of attention before MLP, as llm-compressor does;
`-bs1`: calibration forward passes of one sample, as llm-compressor's default, instead of 8)
(e.g. structured-0.34-0.25-4: one of SmolLM2's 3 KV groups, a quarter of the MLP, 4 of 30 layers).
`--decode 64` adds batch-1 greedy decode speed (what structured pruning buys on every device).
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
PEERS = {  # issue 7, llm-compressor 0.14, 40 windows, 82 calibration rows x 512
    "dense": 20.36, "sparsegpt-50": 61.76, "sparsegpt-2:4": 167.36, "wanda-50": 69.30, "magnitude-50": 598.6,
}
DEFAULT = "dense,magnitude-50,wanda-50,sparsegpt-50,magnitude-2:4,wanda-2:4,sparsegpt-2:4"


def parse_setting(name: str, calib_rows: int) -> dict | None:
    if name == "dense":
        return None
    method, amount = name.split("-", 1)
    if method == "structured":
        heads, mlp, layers = amount.split("-")
        cfg: dict = {"method": "structured", "heads": float(heads), "mlp": float(mlp), "layers": int(layers)}
    else:
        amount, *opts = amount.split("-")  # e.g. wanda-50-noseq: one calibration pass per layer
        cfg = {"method": method, **({"true_sequential": False} if "noseq" in opts else {})}
        batch = next((int(o[2:]) for o in opts if o.startswith("bs") and o[2:].isdigit()), None)
        if batch:  # e.g. wanda-50-bs1: calibration forward passes of one sample (rounding differs)
            cfg["batch_size"] = batch
        if ":" in amount:
            cfg["nm"] = amount
        else:
            cfg["sparsity"] = int(amount) / 100
    cfg["calibration"] = {"source": str(SHARED / "llamafactory" / "c4_demo.jsonl"), "mode": "rows",
                          "seq_len": 512, "num_samples": calib_rows}
    return cfg


def decode_speed(model, tok, new_tokens: int) -> float:
    """Greedy decode tokens/s at batch 1 after a short warm-up (KV cache on, as in real use)."""
    import torch

    ids = tok("The history of the city begins", return_tensors="pt").input_ids.to(next(model.parameters()).device)
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        model.generate(ids, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
        t0 = time.perf_counter()
        model.generate(ids, **kw)
    return new_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default=DEFAULT)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-rows", type=int, default=100000, help="at most this many calibration rows (all 82)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None, help="calibration/eval device (default: cuda if available)")
    ap.add_argument("--decode", type=int, default=0, help="also time greedy decoding of this many tokens "
                                                          "(batch 1; structured pruning's real speed-up)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--peers", nargs="?", const="default", default=None,
                    help="also run llm-compressor in its venv (bench/peers/README.md) on the same calibration and "
                         "evaluation: a comma list like llmc-wanda-50,llmc-sparsegpt-2:4, or no value for its "
                         "SparseGPT and Wanda at 50%% and 2:4")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from qingzhou.compress.prune import prune
    from qingzhou.compress.prune.structured import structured_prune
    from qingzhou.data.corpus import load_text
    from qingzhou.eval.perplexity import perplexity
    from qingzhou.llm import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    text = load_text(str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    dense, tok = load_model("smollm2", dtype="float32", device="cpu")
    dense.to(device)
    rows = []
    for name in args.settings.split(","):
        cfg = parse_setting(name, args.calib_rows)
        model = copy.deepcopy(dense) if cfg is not None else dense
        row: dict = {"setting": name}
        if cfg is not None:
            cfg["device"] = device
            t0 = time.perf_counter()
            if cfg["method"] == "structured":
                report = structured_prune(model, cfg, tokenizer=tok)
                row.update({k: report.summary()[k] for k in ("parameters_before", "parameters_after")})
            else:
                report = prune(model, cfg, tokenizer=tok)
                row["sparsity"] = round(report.sparsity, 4)
            row["prune_s"] = round(time.perf_counter() - t0, 1)
            row["calib_tokens"] = report.calibration.get("tokens")
        res = perplexity(model, tok, text, seq_len=2048, max_windows=args.windows, progress=False)
        row["ppl"] = round(res.ppl, 3)
        row["ppl_s"] = round(res.seconds, 1)
        if args.decode:
            row["decode_tok_s"] = round(decode_speed(model, tok, args.decode), 2)
        if name in PEERS:
            row["llmcompressor_ppl"] = PEERS[name]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"windows": args.windows, "calib_rows": args.calib_rows,
                                                  "device": device, "rows": rows}, indent=2))
        del model
    if args.peers:  # llm-compressor measured here, same calibration rows and windows (CPU only)
        from peers.side_by_side import PRUNE_PEERS, run_peers

        rows += run_peers(PRUNE_PEERS if args.peers == "default" else args.peers, windows=args.windows,
                          calib_rows=args.calib_rows, threads=args.threads, tokenizer=tok)
        if args.out:
            Path(args.out).write_text(json.dumps({"windows": args.windows, "calib_rows": args.calib_rows,
                                                  "device": device, "rows": rows}, indent=2))
    print(f"\n{'setting':18s} {'ppl':>9s} {'llm-compressor':>15s} {'prune s':>8s}")
    for r in rows:
        print(f"{r['setting']:18s} {r['ppl']:9.2f} {r.get('llmcompressor_ppl', float('nan')):15.2f} "
              f"{r.get('prune_s', 0):8.1f}")


if __name__ == "__main__":
    main()
