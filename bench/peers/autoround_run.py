"""AutoRound (Intel `auto-round`) for `bench/fit_quality.py`. Runs INSIDE its own venv.

    /work/peers/autoround/bin/python bench/peers/autoround_run.py --dense DIR --calib calib.safetensors \
        --setting ar-3-g64 --iters 200 --out OUT
Settings: `ar-{bits}-g{group}` (uniform) | `ar-auto-{avg_bits}` (AutoScheme's mixed-bit search over
int 2/3/4/8 bits, group 64, asymmetric, at that average weight bit width, scale/zero bits not
counted, the same per-linear choices our `fit` has, then AutoRound on the chosen scheme).

The venv (`/work/peers/autoround`: torch 2.13.0 CPU, then `pip install auto-round`) never sees
qingzhou: the bench hands over the dense model as a Hugging Face folder and our calibration
samples as token ids (`calib`, [N, 512] int64), and reads back `OUT`: the model with AutoRound's
quantise-dequantised weights written as a dense folder (`save_pretrained`), which our harness
loads like any model, and `autoround.json` (seconds, per-linear bits/group, versions).
Quantise-dequantised weights are exactly what AutoRound's packed export stores, so the measured
perplexity is that of its checkpoint; the stored size is computed by the bench from the bits.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


# AutoRound's own `light` recipe (auto_round/cli/main.py, RECIPES["light"]): 50 steps at lr 5e-3,
# where the default recipe is 200 steps at lr 1 / iters
LIGHT_ITERS, LIGHT_LR = 50, 5e-3


def scheme_for(setting: str):
    """(scheme, description) for AutoRound's `scheme=` argument."""
    from auto_round import AutoScheme
    from auto_round.schemes import QuantizationScheme

    parts = setting.split("-")
    if parts[0] != "ar":
        raise SystemExit(f"unknown AutoRound setting {setting!r}")
    if parts[1] == "auto":
        options = [QuantizationScheme(bits=b, group_size=64, sym=False, data_type="int", act_bits=16)
                   for b in (2, 3, 4, 8)]
        return AutoScheme(avg_bits=float(parts[2]), options=options, ignore_scale_zp_bits=True), "autoscheme"
    bits, group = int(parts[1]), int(parts[2].removeprefix("g"))
    return QuantizationScheme(bits=bits, group_size=group, sym=False, data_type="int", act_bits=16), "uniform"


def qdq_check(model, layers: dict) -> dict:
    """Proof that the weights left in `model` are AutoRound's quantised values: the most distinct
    values in any group of each checked linear, which must be at most 2**bits."""
    import torch

    worst = {}
    for name, cfg in list(layers.items())[:: max(1, len(layers) // 8)]:
        w = model.get_submodule(name).weight.detach()
        g = cfg["group_size"] if cfg["group_size"] > 0 else w.shape[1]
        groups = w.reshape(w.shape[0], -1, g).reshape(-1, g)
        distinct = max(int(torch.unique(row).numel()) for row in groups[:: max(1, len(groups) // 256)])
        worst[name] = {"bits": cfg["bits"], "max_distinct_per_group": distinct, "ok": distinct <= 2 ** cfg["bits"]}
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--setting", required=True)
    ap.add_argument("--iters", type=int, default=200, help="AutoRound's tuning steps per block (0 = its RTN mode; "
                    "50 = its `light` recipe, which also sets lr 5e-3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import auto_round
    import torch
    import transformers
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    calib = load_file(args.calib)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.dense)
    scheme, kind = scheme_for(args.setting)
    t0 = time.perf_counter()
    dataset = [row.unsqueeze(0) for row in calib]
    if kind == "autoscheme":  # AutoScheme accepts only a dataset name or a local .json file of texts:
        dataset = str(Path(args.out).with_name(Path(args.out).name + "-calib.json"))  # our samples, decoded
        Path(dataset).write_text(json.dumps([tok.decode(row) for row in calib]))
    lr = LIGHT_LR if args.iters == LIGHT_ITERS else None  # None: AutoRound's default, 1 / iters
    ar = AutoRound(model, tokenizer=tok, scheme=scheme, dataset=dataset, lr=lr,
                   nsamples=len(calib), seqlen=calib.shape[1], iters=args.iters, device_map="cpu",
                   batch_size=min(8, len(calib)), low_gpu_mem_usage=False,
                   amp=False)  # fp32 throughout, as every other arm (on CPU its default casts the model to bf16)
    qmodel, layer_config = ar.quantize()
    seconds = time.perf_counter() - t0
    layers = {}
    for name, cfg in (layer_config or {}).items():
        if isinstance(cfg, dict) and cfg.get("bits") is not None:
            layers[name] = {"bits": int(cfg["bits"]), "group_size": int(cfg.get("group_size") or -1),
                            "sym": bool(cfg.get("sym"))}
    check = qdq_check(qmodel, layers)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    qmodel.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)  # the weights are dense (quantise-dequantised) floats
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "autoround.json").write_text(json.dumps({
        "setting": args.setting, "kind": kind, "iters": args.iters, "lr": lr, "seconds": round(seconds, 1), "layers": layers,
        "auto_round": auto_round.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "dtype": str(qmodel.dtype), "qdq_check": check, "calib_samples": int(calib.shape[0]), "calib_seq_len": int(calib.shape[1])}, indent=1))
    tmp.rename(out)
    print(json.dumps({"setting": args.setting, "seconds": round(seconds, 1), "layers": len(layers)}))


if __name__ == "__main__":
    main()
