"""How well fit's per-linear proxy predicts end-to-end KL, one decoder layer or one kind of linear at a time.

For each decoder layer (and each kind of linear, across all layers) quantised alone at 2-bit g128
and at 4-bit g64 (GPTQ weights from fit's own sensitivity pass), it measures the held-out KL of the
final logits and sets it against the proxy fit sums (Fisher-weighted GPTQ output error). This is the
measurement behind `compress/fit/kl_scale.py`: on Gemma 3 270M the ratio KL / proxy ranged over 40x
across layers and 6x across kinds, within ~1.5x between 2 and 4 bits of one layer.

    python bench/fit_proxy_check.py --model <path>/gemma-3-270m-q4_k_m.gguf --out bench/results/fit_proxy_check/gemma-3-270m-q4_k_m

Writes `sens.json` (proxy loss of every option of every linear) and `rows.json` (kind, key, option,
predicted, measured KL, ratio) into `--out`
prints one line per plan. ~20 min on 2 CPU cores.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fit_quality as fq  # noqa: E402
from qingzhou.compress.calibrate import LayerwiseOptions, find_decoder_layers  # noqa: E402
from qingzhou.compress.fit.api import _options_of, fit_options, gptq_measure_settings, heldout_kl  # noqa: E402
from qingzhou.compress.fit.fisher import output_fisher  # noqa: E402
from qingzhou.compress.fit.layer_drop import split_layer_name  # noqa: E402
from qingzhou.compress.fit.sensitivity import SensitivityCollector, measure_sensitivity  # noqa: E402
from qingzhou.compress.fit.storage import Option  # noqa: E402
from qingzhou.compress.quantize.registry import QUANTIZERS  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--model", default="smollm2")
ap.add_argument("--out", required=True)
ap.add_argument("--held", type=int, default=4, help="held-out samples the KL is measured on")
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()

out, n_held_kl = Path(args.out), args.held
b = fq.setup(args.model, out, threads=args.threads, ar_iters=0)  # fit_quality's text, tokenizer and calibration
samples = b.samples
model, _ = b.load()
cfg = QUANTIZERS.validate(fq.parse_setting("gptq-asym-4-g64"))
linears = fq.decoder_linears(model)
n_held = round(0.1 * len(samples))
measure, held = samples[:-n_held], samples[-n_held:]
t = time.time()
step = max(1, len(measure) // 16)
F = output_fisher(model, measure[::step][:16], linears)
print("fisher", time.time() - t, flush=True)
space = fit_options()
per = {n: _options_of(m.in_features, space) for n, m in linears.items()}
col = SensitivityCollector(space, sym=cfg.sym, clip_search=cfg.clip_search, gptq=gptq_measure_settings(cfg),
                           keep_weights=True, options_of=lambda n, m: per[n], row_weights=F)
eng = LayerwiseOptions(device=None, batch_size=8, offload_inputs=False, targets=linears.__contains__, true_sequential=False)
t = time.time()
sens = measure_sensitivity(model, measure, layerwise=eng, collector=col)
print("sens", time.time() - t, flush=True)
(out / "sens.json").write_text(json.dumps({n: {o.label: e for o, e in s.errors.items()} for n, s in sens.items()}))
work = copy.deepcopy(model)
keep = Option()
_, prefix = find_decoder_layers(model)


def typ(n: str) -> str:
    return n.rsplit(".", 1)[-1]


def layer(n: str) -> int:
    return split_layer_name(n, prefix)[0]


layers = sorted({layer(n) for n in linears})
types = sorted({typ(n) for n in linears})
opts = {"w2g128": Option(2, 128), "w4g64": Option(4, 64), "w3g64": Option(3, 64)}
plans, names = [], []
for L in layers:
    for on in ("w2g128", "w4g64"):
        plans.append({n: (opts[on] if layer(n) == L else keep) for n in linears})
        names.append(("layer", L, on))
for ty in types:
    plans.append({n: (opts["w2g128"] if typ(n) == ty else keep) for n in linears})
    names.append(("type", ty, "w2g128"))
    plans.append({n: (opts["w4g64"] if typ(n) == ty else keep) for n in linears})
    names.append(("type", ty, "w4g64"))
plans.append({n: opts["w3g64"] for n in linears})
names.append(("all", "all", "w3g64"))
plans.append({n: opts["w4g64"] for n in linears})
names.append(("all", "all", "w4g64"))
t = time.time()
kls = heldout_kl(model, work, held[:n_held_kl], plans, col.weights, cfg)
print("kl", time.time() - t, flush=True)
rows = []
for (kind, key, on), p, kl in zip(names, plans, kls):
    pred = sum(sens[n].errors[o] for n, o in p.items() if not o.keep)
    rows.append({"kind": kind, "key": key, "opt": on, "pred": pred, "kl": kl, "ratio": kl / pred if pred else None})
    print(kind, key, on, f"pred {pred:.4g} kl {kl:.4g} ratio {kl/pred if pred else 0:.4g}", flush=True)
(out / "rows.json").write_text(json.dumps(rows, indent=1))
