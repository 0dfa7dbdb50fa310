"""Streaming quantization of models larger than the memory budget: peak RSS, seconds per layer and
peak RSS / model bytes for GPTQ 4-bit g128, qingzhou's streaming engine beside llm-compressor.

Protocol (issue 20): random-weight models of real shapes saved as sharded bf16 safetensors
(SmolLM2-135M, Llama-3.2-1B, Llama-3.2-3B), GPTQ 4-bit, group size 128, 16 x 256 calibration
tokens (seeded random ids: memory and time do not depend on the text), batch 8, on CPU. Each run
is its own process under `/usr/bin/time -v`, whose "Maximum resident set size" is the peak RSS
(file-backed pages of the memory-mapped shards included). The budget (default 2 GiB) is what the
peak is judged against; it is not enforced. qingzhou runs `quantize(folder, cfg, calib,
output_dir=..., streaming=True)`, the same call as `qingzhou quantize MODEL OUT --streaming`;
llm-compressor (its own venv, found by `--llmc-python` or $QINGZHOU_LLMC_PYTHON; skipped and
said so when absent) loads the whole model with transformers and runs `oneshot` with
`GPTQModifier(scheme="W4A16", ignore=["lm_head"])` on the same token ids.

    python bench/big_model_stream.py --tiny                         # proves the bench works (seconds)
    python bench/big_model_stream.py --make-smollm2 /work/peers/models/smollm2-135m-random
    python bench/big_model_stream.py --models /work/peers/models/smollm2-135m-random \\
        /work/peers/models/llama-3.2-1b-random /work/peers/models/llama-3.2-3b-random \\
        --llmc-python /work/peers/llmc/bin/python --peers-on llama-3.2-1b-random,llama-3.2-3b-random \\
        --out bench/results/big_model_stream.json
    (--tools qingzhou or --tools llmcompressor runs one side only; --activations disk maps the
    calibration activations from a file)

Target: peak RSS <= 35% of the model's bytes at 3B, falling with size.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME = "/usr/bin/time"

QINGZHOU_CHILD = r"""
import json, sys, time, torch
from qingzhou.compress.quantize import quantize
src, out, n, seq, vocab, activations = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
g = torch.Generator().manual_seed(0)
calib = list(torch.randint(0, vocab, (n, seq), generator=g))
cfg = {"method": "gptq", "bits": 4, "group_size": 128, "on_indivisible_group": "fallback", "batch_size": 8}
t0 = time.perf_counter()
rep = quantize(src, cfg, calib, output_dir=out, streaming=True, activations=activations)
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "layers": rep.calibration.get("layers"),
                              "quantized_linears": len(rep.modules), "linear_mb_after": rep.summary()["linear_mb_after"]}))
"""

LLMC_CHILD = r"""
import json, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
src, out, n, seq, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, vocab, (n, seq), generator=g)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
# the ids are given; oneshot still wants a processor: a one-word tokenizer stands in
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                              unk_token="<unk>", pad_token="<unk>")
oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, max_seq_length=seq, num_calibration_samples=n)
model.save_pretrained(out, save_compressed=True)
layers = model.config.num_hidden_layers
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "layers": layers}))
"""


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def vocab_size(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["vocab_size"])


def timed(cmd: list[str], env: dict[str, str], timeout: float | None) -> dict:
    """Run `cmd` under /usr/bin/time -v: its RESULT line plus peak RSS and wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run([TIME, "-v", *cmd], env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    res = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or res is None:
        own = proc.stderr.split("\tCommand being timed")[0]  # the child's stderr without time's report
        return {"error": f"exit {proc.returncode}: " + own[-1500:]}
    return {**res, "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None, "wall_seconds": wall}


def run_one(tool: str, folder: Path, args: argparse.Namespace, python: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"stream-{tool}-", dir=args.scratch)) / "out"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    if tool == "qingzhou":
        env["PYTHONPATH"] = str(REPO)
        cmd = [python, "-c", QINGZHOU_CHILD, str(folder), str(out), str(args.samples), str(args.seq_len),
               str(vocab_size(folder)), args.activations]
    else:
        cmd = [python, "-c", LLMC_CHILD, str(folder), str(out), str(args.samples), str(args.seq_len),
               str(vocab_size(folder))]
    try:
        res = timed(cmd, env, args.timeout)
    except subprocess.TimeoutExpired:
        res = {"error": f"timed out after {args.timeout} s"}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    size = model_bytes(folder)
    res.update(tool=tool, model=folder.name, model_bytes=size)
    if res.get("peak_rss_bytes"):
        res["peak_rss_over_model"] = res["peak_rss_bytes"] / size
        res["within_budget"] = res["peak_rss_bytes"] <= args.budget_gib * 2**30
    if res.get("layers") and res.get("seconds"):
        res["seconds_per_layer"] = res["seconds"] / res["layers"]
    return res


def make_model(folder: Path, shape: str, seed: int = 0) -> Path:
    """A random-weight model of a real shape, saved as sharded bf16 safetensors (once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = {
        "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                             max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5),
        "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    }
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", **shapes[shape])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="100MB" if shape != "tiny" else "1MB")
    os.replace(tmp, folder)
    return folder


def table(rows: list[dict]) -> str:
    head = f"{'tool':<12}{'model':<28}{'model GB':>9}{'peak RSS GB':>12}{'RSS/model':>10}{'s/layer':>9}{'budget':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['tool']:<12}{r['model']:<28} {r['error'][:120]!r}")
            continue
        lines.append(f"{r['tool']:<12}{r['model']:<28}{r['model_bytes'] / 1e9:>9.2f}{r['peak_rss_bytes'] / 2**30:>12.2f}"
                     f"{r['peak_rss_over_model']:>10.1%}{r.get('seconds_per_layer', 0):>9.1f}"
                     f"{'ok' if r['within_budget'] else 'OVER':>8}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", type=Path, default=[], help="sharded safetensors model folders")
    ap.add_argument("--make-smollm2", type=Path, help="create a random SmolLM2-135M-shaped bf16 model here (once)")
    ap.add_argument("--tiny", action="store_true", help="a 4-layer toy model in a temp folder: proves the bench runs")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--budget-gib", type=float, default=2.0)
    ap.add_argument("--activations", default="cpu", choices=["cpu", "disk"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run")
    ap.add_argument("--python", default=sys.executable, help="python with torch/transformers for qingzhou")
    ap.add_argument("--llmc-python", default=os.environ.get("QINGZHOU_LLMC_PYTHON", "/work/peers/llmc/bin/python"))
    ap.add_argument("--tools", default="qingzhou,llmcompressor", help="which to run, comma-separated")
    ap.add_argument("--peers-on", default="all", help="comma-separated model folder names to run llm-compressor on "
                                                     "(default: all)")
    ap.add_argument("--scratch", type=Path, default=None, help="where outputs are written (and deleted)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    if not Path(TIME).exists():
        sys.exit(f"{TIME} is needed to measure peak RSS (apt-get install time)")
    models = list(args.models)
    if args.make_smollm2:
        models.insert(0, make_model(args.make_smollm2, "smollm2-135m"))
    if args.tiny:
        models.insert(0, make_model(Path(tempfile.mkdtemp(prefix="stream-bench-")) / "tiny-llama", "tiny"))
        args.samples, args.seq_len = 4, 32
    if not models:
        ap.error("nothing to run: --models, --make-smollm2 or --tiny")
    peers_on = {m.name for m in models} if args.peers_on == "all" else set(filter(None, args.peers_on.split(",")))
    llmc = Path(args.llmc_python)
    tools = set(args.tools.split(","))
    rows = []
    for folder in models:
        if "qingzhou" in tools:
            rows.append(run_one("qingzhou", folder, args, args.python))
            print(json.dumps(rows[-1]), flush=True)
        if "llmcompressor" in tools and folder.name in peers_on:
            if not llmc.exists():
                rows.append({"tool": "llmcompressor", "model": folder.name,
                             "error": f"not installed ({llmc} missing; see bench/peers)"})
            else:
                rows.append(run_one("llmcompressor", folder, args, str(llmc)))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    print(f"(budget {args.budget_gib} GiB; {args.samples} x {args.seq_len} calibration tokens; GPTQ 4-bit g128; "
          f"{args.threads} threads; activations {args.activations})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
