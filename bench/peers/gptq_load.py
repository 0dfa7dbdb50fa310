"""Load a qingzhou GPTQ folder with GPTQModel and with transformers, and dump what they compute.

Runs inside the GPTQModel venv (`/work/peers/gptqmodel`, see bench/peers/README.md), never in
qingzhou's: it imports neither qingzhou nor anything of ours, so what it reports is what those
tools make of the files alone. `bench/interop.py` and `tests/test_interop_gptq_peers.py` drive it.

Input (`--inputs`, safetensors): `ids` [B, T] int64 (logits are dumped for these) and optionally
`windows` [N, T] int64 (perplexity: summed next-token NLL and token count over all windows).
Output (`--out`, safetensors): `<case>.<loader>.logits` float32 [B, T, V], `<case>.<loader>.nll_sum`,
`<case>.<loader>.tokens`; and `--out`.json with per case and loader: status (and the tool's error),
dtype, kernel classes, load seconds, decode tokens/s.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load_gptqmodel(folder: str, dtype: torch.dtype):
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH, dtype=dtype)
    return model.model if hasattr(model, "model") and not hasattr(model, "generate_raw") else model


def load_transformers(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=dtype)


LOADERS = {"gptqmodel": load_gptqmodel, "transformers": load_transformers}


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def nll(model, windows: torch.Tensor) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            logits = model(input_ids=w[None]).logits.float()[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            count += int(w.numel() - 1)
    return total, count


def decode_speed(model, prompt: torch.Tensor, new_tokens: int) -> float:
    with torch.inference_mode():
        model.generate(input_ids=prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm up
        t0 = time.perf_counter()
        model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--folder", required=True, action="append",
                    help="NAME=PATH (or PATH, named 'model'); repeat to load several in one process")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--loaders", default="gptqmodel:bfloat16,transformers:float32",
                    help="loader:dtype,... (GPTQModel's CPU torch kernel takes float16/bfloat16 only)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--decode-tokens", type=int, default=0, help="0: skip the speed measurement")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = load_file(args.inputs)
    tensors, info = {}, {"torch": torch.__version__, "cases": {}}
    for case_spec in args.folder:
        case, _, folder = case_spec.rpartition("=")
        case = case or "model"
        info["cases"][case] = run_case(folder, case, args, inputs, tensors)
    save_file(tensors, args.out)
    Path(args.out + ".json").write_text(json.dumps(info, indent=1))


def run_case(folder: str, case: str, args: argparse.Namespace, inputs: dict, tensors: dict) -> dict:
    """Load `folder` with every loader; logits and NLL go into `tensors` as `<case>.<loader>.*`."""
    rows: dict = {}
    for spec in args.loaders.split(","):
        name, _, dtype_name = spec.partition(":")
        dtype = getattr(torch, dtype_name or "bfloat16")
        row = rows[name] = {"dtype": dtype_name or "bfloat16"}
        key = f"{case}.{name}"
        try:
            import importlib.metadata as md

            row["version"] = md.version("gptqmodel" if name == "gptqmodel" else "transformers")
            t0 = time.perf_counter()
            model = LOADERS[name](folder, dtype)
            row["load_s"] = round(time.perf_counter() - t0, 2)
            row["class"] = type(model).__name__
            row["kernels"] = sorted({type(m).__name__ for m in model.modules() if "QuantLinear" in type(m).__name__
                                     or "Linear" in type(m).__name__ and hasattr(m, "qweight")})
            tensors[f"{key}.logits"] = forward_logits(model, inputs["ids"])
            if "windows" in inputs:
                s, n = nll(model, inputs["windows"])
                tensors[f"{key}.nll_sum"] = torch.tensor([s], dtype=torch.float64)
                tensors[f"{key}.tokens"] = torch.tensor([n])
            if args.decode_tokens:
                row["decode_tok_s"] = round(decode_speed(model, inputs["ids"][:1, :16], args.decode_tokens), 2)
            row["ok"] = True
        except Exception as e:  # report what the tool said, keep going with the next loader
            row["ok"] = False
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            row["traceback"] = traceback.format_exc()[-4000:]
    return rows


if __name__ == "__main__":
    main()
