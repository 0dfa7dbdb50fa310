"""Same-process interleaved A/B of one LoRA training step's forward+backward on SmolLM2, 1 thread, CPU time.

Why: on a shared machine wall time is noise; process CPU time of a single-threaded step measures
the work done. Variants: `qz_fused` (the loop's token_loss_sum), `qz_plain` (full logits + CE),
`hf_flat` (one flattened row with HF's own loss, the DataCollatorWithFlattening shape), and, with
VARIANTS=levers, `qz_pattn` / `qz_flora` / `qz_both` (packed attention / fused LoRA linear / both).
The model folder is the one bench/finetune_speed.py writes (QZ_MODEL_DIR).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/bench/speed VARIANTS=levers REPS=3 python bench/speed/lever_ab.py
"""

import os
import random
import time
import torch

torch.set_num_threads(1)
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from qingzhou.data import DataConfig, prepare_data  # noqa: E402
from qingzhou.data.packing import collate  # noqa: E402
from qingzhou.finetune.methods import build_method, parse_finetune_config  # noqa: E402
from qingzhou.finetune.loop import token_loss_sum  # noqa: E402

folder = os.environ.get("QZ_MODEL_DIR", "/tmp/qz-bench/smollm2-hf")
ML = int(os.environ.get("ML", 512))
NROW = int(os.environ.get("NROW", 2))
REPS = int(os.environ.get("REPS", 2))
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
data = prepare_data(
    DataConfig(
        source=os.path.join(os.environ.get("QZ_SHARED", "../shared"), "data/llamafactory/alpaca_en_demo.json"),
        max_length=ML,
        eval_fraction=0,
        max_samples=200,
        packing=True,
        cache=False,
    ),
    tok,
)
cfg = parse_finetune_config({"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0})
model = build_method(model, cfg)
model.config.use_cache = False
rows = random.Random(int(os.environ.get("SEED", 0))).sample(data.train, NROW)  # the loop draws rows at random too
batch = collate(rows, tok.pad_token_id, packed=True)
n_real = sum(len(r) for r in rows)
lab = batch["labels"]
print("batch", tuple(batch["input_ids"].shape), "real", n_real, "labelled", int((lab != -100).sum()), flush=True)
# flattened single row (DataCollatorWithFlattening shape): concat real tokens only
ids = torch.cat([torch.tensor(r.input_ids) for r in rows])[None]
pos = torch.cat([torch.tensor(r.position_ids) for r in rows])[None]
labs = torch.cat([torch.tensor(r.labels) for r in rows])[None]
flat = {"input_ids": ids, "position_ids": pos, "labels": labs}


def plain(model, batch):
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100, reduction="sum"), 0


def hf(model, batch):
    return model(**batch, use_cache=False).loss, 0


variants = {"qz_fused": (token_loss_sum, batch), "qz_plain": (plain, batch), "hf_flat": (hf, flat)}
extra = os.environ.get("VARIANTS")
if extra:
    import importlib

    mod = importlib.import_module(extra)
    variants.update(mod.variants(batch, flat))
names = os.environ.get("ONLY", ",".join(variants)).split(",")
params = [p for p in model.parameters() if p.requires_grad]
res = {n: [] for n in names}
for rep in range(REPS + 1):
    for n in names:
        fn, b = variants[n]
        t0 = time.process_time()
        w0 = time.perf_counter()
        loss, _ = fn(model, b)
        t1 = time.process_time()
        loss.backward()
        t2 = time.process_time()
        for p in params:
            p.grad = None
        if rep:
            res[n].append((t1 - t0, t2 - t1))
        print(
            n, rep, f"fwd {t1 - t0:.2f} bwd {t2 - t1:.2f} wall {time.perf_counter() - w0:.2f}", float(loss), flush=True
        )
for n in names if REPS else []:
    f = sum(a for a, _ in res[n]) / REPS
    b = sum(b for _, b in res[n]) / REPS
    print(f"SUMMARY {n}: fwd {f:.2f}s bwd {b:.2f}s total {f + b:.2f}s")
