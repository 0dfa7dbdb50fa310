"""One Trainer-based fine-tuning arm of `bench/finetune_speed.py`, run in its own process and venv.

Arms (each the strongest setting its users would pick on this workload):
- `hf_pad`      transformers `Trainer` + peft, batches padded (DataCollatorForSeq2Seq): the old baseline.
- `hf_flatten`  transformers `Trainer` + peft, padding-free packing (`DataCollatorWithFlattening`:
                a batch is one row with position ids restarting per sample). Runs in our venv.
- `trl`         TRL `SFTTrainer` with `packing=True` (best-fit-decreasing, padding-free). Runs in the
                TRL venv (`QZ_TRL_PYTHON`, default /work/peers/trl/bin/python).
- `llamafactory` LLaMA-Factory's own SFT workflow (`run_exp`) with `packing: true`. Runs in its venv
                (`QZ_LF_PYTHON`, default /work/peers/lf/bin/python); it tokenises the alpaca file with
                its own template, the others read the token ids qingzhou wrote.

Every arm measures the same way: a forward pre-hook counts the real tokens of each micro-batch
(attention-mask ones, or every id of a flattened row), a callback stamps the end of every optimizer
step, and tokens/s is taken over steps 2..N (step 1 pays one-time warm-up in every framework).
Prints one JSON object on the last line of stdout.

    python bench/peers/sft_arm.py --arm hf_flatten --model-dir M --rows-file R --steps 10 ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM). Not ru_maxrss: that survives fork+exec, so a
    child started by a parent that had loaded a model would report the parent's peak too."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Meter:
    """Token counts per forward and a timestamp per optimizer step."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.step_tokens: list[int] = []
        self.stamps: list[float] = []

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is not None and module.training:
            self.tokens.append(int((mask > 0).sum()) if mask is not None and mask.dim() == 2 else int(ids.numel()))

    def step_end(self) -> None:
        self.stamps.append(time.perf_counter())
        self.step_tokens.append(sum(self.tokens))
        self.tokens.clear()

    def result(self) -> dict:
        n = len(self.stamps)
        tokens = sum(self.step_tokens[1:])
        seconds = self.stamps[-1] - self.stamps[0] if n > 1 else float("nan")
        return {"steps": n, "tokens_per_s": tokens / seconds, "tokens_per_step": tokens / max(1, n - 1),
                "seconds_steps_2_to_n": seconds, "peak_mb": peak_rss_mb()}


def _callback(meter: Meter):
    from transformers import TrainerCallback

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.step_end()

    return Stamp()


def _lora(method: str, dropout: float):
    if method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS)


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _targs(cls, a, batch: int, **extra):
    return cls(output_dir=tempfile.mkdtemp(prefix=f"bench-{a.arm}-"), per_device_train_batch_size=batch, max_steps=a.steps,
               learning_rate=a.lr, report_to=[], save_strategy="no", logging_steps=a.steps, disable_tqdm=True,
               use_cpu=True, dataloader_num_workers=0, lr_scheduler_type="cosine",
               max_grad_norm=1.0, seed=0, warmup_steps=int(0.05 * a.steps), **extra)


def _load_model(a):
    """The model in fp32 with SDPA; for QLoRA the usual HF recipe: NF4 + double quantisation through
    from_pretrained, then peft's k-bit preparation (what TRL and LLaMA-Factory do for a 4-bit model)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    extra = {}
    if a.method == "qlora":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa", **extra)
    if a.method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def run_hf(a, meter: Meter) -> dict:
    import peft
    from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening,
                              Trainer, TrainingArguments)

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = _load_model(a)
    if a.method != "full":
        model = peft.get_peft_model(model, _lora(a.method, a.dropout))
    rows = _rows(a.rows_file)
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    if a.arm == "hf_flatten":  # samples per step chosen so a step carries the packed arms' tokens
        batch = max(1, round(a.tokens_per_step / mean))
        collator = DataCollatorWithFlattening(return_position_ids=True)
        data = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    else:
        batch = max(1, round(a.tokens_per_step / mean))
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        data = [{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]), "labels": r["labels"]} for r in rows]
    model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    trainer = Trainer(model=model, args=_targs(TrainingArguments, a, batch), train_dataset=data, data_collator=collator,
                      callbacks=[_callback(meter)])
    trainer.train()
    return {"batch": batch}


def run_trl(a, meter: Meter) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = _load_model(a)
    rows = _rows(a.rows_file)
    # token ids as qingzhou wrote them; completion_mask keeps the loss on the answers, as in every arm
    data = Dataset.from_list([{"input_ids": r["input_ids"],
                               "completion_mask": [int(lab != -100) for lab in r["labels"]]} for r in rows])
    batch = max(1, round(a.tokens_per_step / a.max_length))
    cfg = _targs(SFTConfig, a, batch, packing=True, max_length=a.max_length, completion_only_loss=True,
                 dataset_text_field=None)
    model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                         peft_config=_lora(a.method, a.dropout), callbacks=[_callback(meter)])
    trainer.train()
    return {"batch": batch}


def run_llamafactory(a, meter: Meter) -> dict:
    from llamafactory.train.tuner import run_exp

    data_dir = tempfile.mkdtemp(prefix="bench-lf-data-")
    with open(os.path.join(data_dir, "dataset_info.json"), "w") as f:
        json.dump({"alpaca_bench": {"file_name": os.path.abspath(a.alpaca)}}, f)
    batch = max(1, round(a.tokens_per_step / a.max_length))
    args = {"stage": "sft", "do_train": True, "model_name_or_path": a.model_dir, "dataset": "alpaca_bench",
            "dataset_dir": data_dir, "template": "empty", "cutoff_len": a.max_length, "max_samples": a.rows,
            "packing": True, "finetuning_type": "full" if a.method == "full" else "lora", "output_dir": tempfile.mkdtemp(),
            "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "max_steps": a.steps,
            "learning_rate": a.lr, "lr_scheduler_type": "cosine", "warmup_steps": int(0.05 * a.steps), "logging_steps": a.steps,
            "save_strategy": "no", "report_to": "none", "bf16": False, "fp16": False, "use_cpu": True,
            "overwrite_output_dir": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
            "disable_tqdm": True, "plot_loss": False}
    if a.method == "qlora":  # LLaMA-Factory's QLoRA: bitsandbytes NF4 with double quantisation (its defaults)
        args.update({"quantization_bit": 4, "quantization_method": "bnb", "quantization_type": "nf4",
                     "double_quantization": True})
    if a.method != "full":
        args.update({"lora_rank": 16, "lora_alpha": 32, "lora_dropout": a.dropout, "lora_target": ",".join(TARGETS)})

    from transformers import TrainerCallback

    class Hook(TrainerCallback):  # LLaMA-Factory builds the model inside run_exp: attach the counter at train start
        def on_train_begin(self, args, state, control, model=None, **kw):
            model.register_forward_pre_hook(meter.hook, with_kwargs=True)

        def on_step_end(self, args, state, control, **kw):
            meter.step_end()

    run_exp(args, callbacks=[Hook()])
    return {"batch": batch}


ARMS = {"hf_pad": run_hf, "hf_flatten": run_hf, "trl": run_trl, "llamafactory": run_llamafactory}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arm", required=True, choices=sorted(ARMS))
    ap.add_argument("--method", default="lora", choices=["lora", "full", "qlora"])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--rows-file", help="JSONL of {input_ids, labels} (qingzhou's tokenisation)")
    ap.add_argument("--alpaca", help="the alpaca JSON file (LLaMA-Factory tokenises it itself)")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--tokens-per-step", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    meter = Meter()
    extra = ARMS[a.arm](a, meter)
    import transformers

    versions = {"transformers": transformers.__version__}
    for pkg in ("trl", "llamafactory", "peft"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - absent in this venv
            pass
    print(json.dumps({"arm": a.arm, "method": a.method, **meter.result(), **extra, "versions": versions}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
