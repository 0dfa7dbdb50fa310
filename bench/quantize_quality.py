"""Quantization quality on SmolLM2-135M: WikiText-2 test perplexity for FP, RTN and GPTQ settings.

Protocol (the issue's): `"\\n\\n".join(rows)` of wiki.test.raw, 2048-token windows, first 40 windows;
calibration = the rows of llamafactory/c4_demo.jsonl with >= 512 tokens, truncated to 512, fp32 on
CPU. Each setting starts from a freshly loaded model. Peer numbers measured by the issue author
with the same protocol are printed alongside for reference (not re-run here).

    python bench/quantize_quality.py                       # default settings
    python bench/quantize_quality.py --settings fp,rtn-asym-4,gptq-asym-4 --out /tmp/q.json
Setting names: fp | bnb-{nf4,int8} | sq-8 | {rtn,gptq,awq,awqgptq}-{sym,asym}-{bits}[-g{group}][-noclip]
[-noact][-noseq][-static|-dyn][-hclip|-nohclip][-dense<fraction>|-nodense] (group default 64; see parse_setting).
Add `--tasks arc_easy,piqa` for zero-shot task scores of every setting.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PEERS = {  # from the issue: llm-compressor 0.14 and others, same protocol
    "4-bit g64": {"llmc GPTQ sym": 27.18, "llmc GPTQ asym": 24.27, "llmc AWQ asym": 24.72,
                  "RTN asym (issue)": 26.98, "bnb NF4": 25.92},
    "3-bit g64": {"llmc GPTQ sym": 80.34, "llmc GPTQ asym": 43.36, "RTN asym (issue)": 72.51},
    "fp": {"dense fp32 (issue)": 20.36},
}


OPTIONS = {"noclip": {"clip_search": False}, "noact": {"act_order": False}, "noseq": {"true_sequential": False},
           "static": {"static_groups": True}, "dyn": {"static_groups": False},
           "hclip": {"hessian_clip": True}, "nohclip": {"hessian_clip": False},
           "nodense": {"dense_target": 0.0}, "refit": {"refit_max_bits": 8}, "norefit": {"refit_max_bits": 0}}


def parse_setting(name: str) -> dict | None:
    """`fp` -> None; `bnb-nf4`/`bnb-int8`; `sq-8` (SmoothQuant W8A8, alpha 0.5);
    `{rtn,gptq,awq,awqgptq}-{sym,asym}-{bits}[-g{group}][-noclip][-noact][-noseq][-static|-dyn][-hclip|-nohclip]`.

    `awqgptq` is AWQ's scale search followed by GPTQ rounding on the scaled weights; `noclip` turns
    the per-group range search off, `noact` GPTQ's act-order, `noseq` true-sequential order;
    `static`/`dyn` fix every group's grid from the original weights before the column loop (as
    llm-compressor does; GPTQ's default) or when the loop reaches the group; `hclip`/`nohclip` weigh
    the clip search's per-column error by the Hessian diagonal (GPTQ's default) or not; `dense0.25`/
    `nodense` move GPTQ's target that fraction toward the dense model's outputs
    (`GPTQConfig.dense_target`) or not.
    """
    if name == "fp":
        return None
    parts = name.split("-")
    calibration = {"source": str(SHARED / "llamafactory" / "c4_demo.jsonl"), "mode": "rows",
                   "seq_len": 512, "num_samples": 100000}
    if parts[0] == "bnb":
        return {"method": "bnb", "quant_type": parts[1], "device": "cpu", "compute_dtype": "float32"}
    if parts[0] == "sq":
        return {"method": "smoothquant", "calibration": calibration}
    method, grid, bits = parts[0], parts[1], int(parts[2])
    cfg: dict = {"method": method, "bits": bits, "group_size": 64, "sym": grid == "sym"}
    for opt in parts[3:]:
        if opt.startswith("dense") and opt != "dense":  # dense0.25: GPTQConfig.dense_target
            cfg["dense_target"] = float(opt[5:])
            continue
        if opt.startswith("g") and opt[1:].lstrip("-").isdigit():
            cfg["group_size"] = int(opt[1:])
        elif opt in OPTIONS:
            cfg.update(OPTIONS[opt])
        else:
            raise SystemExit(f"unknown setting option {opt!r} in {name!r} (expected g<size> or one of {sorted(OPTIONS)})")
    if method == "awqgptq":
        cfg.update(method="awq", solver="gptq")
    if cfg["method"] in ("gptq", "awq"):
        cfg["calibration"] = calibration
    return cfg


def task_scores(model, tok, tasks: str, limit: int) -> dict:
    """Zero-shot scores of the shipped tasks named in `tasks` (comma list) on their first `limit`
    rows, from ../shared/data/tasks: {task: score}, plus the harness seconds."""
    if not tasks:
        return {}
    from qingzhou.eval.harness import evaluate

    out = evaluate(model, tok, tasks.split(","), limit=limit, data_dir=SHARED, progress=False)
    scores = {t: round(r["score"], 4) for t, r in out["results"].items()}
    return {"tasks": scores, "tasks_s": out["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="fp,rtn-asym-4,gptq-asym-4,rtn-asym-3,gptq-asym-3")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--tasks", default="", help="also score these shipped tasks zero-shot (e.g. arc_easy,piqa)")
    ap.add_argument("--task-limit", type=int, default=500, help="first N rows of each task")
    ap.add_argument("--peers", nargs="?", const="default", default=None,
                    help="also run llm-compressor in its venv (bench/peers/README.md) on the same calibration and "
                         "evaluation: a comma list like llmc-gptq-asym-4,llmc-awq-asym-4, or no value for its GPTQ "
                         "sym/asym at 4 and 3 bits")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from qingzhou.compress.quantize import quantize
    from qingzhou.data.corpus import load_text
    from qingzhou.eval.perplexity import perplexity
    from qingzhou.llm import load_model

    text = load_text(str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    rows = []
    for name in args.settings.split(","):
        cfg = parse_setting(name)
        model, tok = load_model("smollm2", dtype="float32", device="cpu")
        row = {"setting": name}
        if cfg is not None:
            t0 = time.perf_counter()
            report = quantize(model, cfg, tokenizer=tok)
            row["quantize_s"] = round(time.perf_counter() - t0, 1)
            row.update({k: v for k, v in report.summary().items() if k in ("linear_mb_before", "linear_mb_after",
                                                                             "warnings", "peak_memory_mb")})
            row["calib_tokens"] = report.calibration.get("tokens")
        res = perplexity(model, tok, text, seq_len=2048, max_windows=args.windows, progress=False)
        row["ppl"] = round(res.ppl, 3)
        row["ppl_s"] = round(res.seconds, 1)
        row.update(task_scores(model, tok, args.tasks, args.task_limit))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows, "peers": PEERS}, indent=2))
    if args.peers:
        from peers.side_by_side import QUANT_PEERS, run_peers

        rows += run_peers(QUANT_PEERS if args.peers == "default" else args.peers, windows=args.windows,
                          calib_rows=100000, threads=args.threads, tokenizer=tok)
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows, "peers": PEERS}, indent=2))
    tasks = [t for t in args.tasks.split(",") if t]
    print("\nsetting               ppl      quantize s" + "".join(f"  {t:>12}" for t in tasks))
    for r in rows:
        print(f"{r['setting']:<20} {r['ppl']:>8.3f}  {r.get('quantize_s', '-')!s:>8}"
              + "".join(f"  {r.get('tasks', {}).get(t, float('nan')):>12.4f}" for t in tasks))
    print("\npeers (issue, same protocol):")
    for width, peers in PEERS.items():
        print(f"  {width}: " + ", ".join(f"{k} {v}" for k, v in peers.items()))


if __name__ == "__main__":
    main()
