"""llm-compressor 0.14 on SmolLM2-135M under our benchmark protocol. Runs INSIDE the peer venv.

The venv (`/work/llmc-venv`, see README.md here) has transformers 5.17, which llm-compressor pins;
qingzhou itself is imported from this checkout, so the model loading (`qingzhou.llm.load_model`,
GGUF dequantised), the calibration selection (`qingzhou.data.calibration.load_calibration`, rows
of c4_demo.jsonl with >= 512 tokens, truncated to 512) and the evaluation
(`qingzhou.eval.perplexity.perplexity`, WikiText-2 test, 2048-token windows) are the very code our
own rows use. Only the compression step is llm-compressor's: one modifier recipe per setting,
applied through `oneshot` with its default hyper-parameters apart from the grid/sparsity asked for.

    /work/llmc-venv/bin/python bench/peers/llmc_run.py --settings llmc-gptq-asym-4 --append /work/benchout/peers.jsonl
    /work/llmc-venv/bin/python bench/peers/llmc_run.py --settings llmc-wanda-50 --windows 2 --calib-rows 4   # smoke
Settings: see `side_by_side.parse_peer_setting`. One JSON row per setting on stdout (and `--out`/`--append`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's qingzhou
sys.path.insert(0, str(Path(__file__).resolve().parent))

from side_by_side import (  # noqa: E402
    EVAL_SOURCE, SEQ_LEN_CALIB, SEQ_LEN_EVAL, PeerSetting, calibration_config, fingerprint, parse_peer_setting,
)

RECIPES: dict[str, Callable[[PeerSetting], list]] = {}


def recipe(kind: str):
    """Register the llm-compressor modifiers for one kind of setting."""
    def decorate(fn: Callable[[PeerSetting], list]) -> Callable[[PeerSetting], list]:
        RECIPES[kind] = fn
        return fn

    return decorate


def weight_only_group(s: PeerSetting) -> dict:
    """Integer weight-only quantization with groups, every Linear but lm_head (as ours)."""
    return {"group_0": {"targets": ["Linear"], "weights": {"num_bits": s.bits, "type": "int", "symmetric": s.sym,
                                                           "strategy": "group", "group_size": s.group_size}}}


@recipe("gptq")
def _gptq(s: PeerSetting) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [GPTQModifier(targets=["Linear"], ignore=["lm_head"], config_groups=weight_only_group(s))]


@recipe("awq")
def _awq(s: PeerSetting) -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    return [AWQModifier(), QuantizationModifier(targets=["Linear"], ignore=["lm_head"], config_groups=weight_only_group(s))]


@recipe("sparsegpt")
def _sparsegpt(s: PeerSetting) -> list:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return [SparseGPTModifier(sparsity=s.sparsity, mask_structure=s.mask, targets=["Linear"], ignore=["re:.*lm_head"])]


@recipe("wanda")
def _wanda(s: PeerSetting) -> list:
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return [WandaPruningModifier(sparsity=s.sparsity, mask_structure=s.mask, targets=["Linear"], ignore=["re:.*lm_head"])]


def allow_cpu_only_awq() -> None:
    """llm-compressor's AWQ pins cached activations for faster host-to-device copies; without an
    accelerator `Tensor.pin_memory` raises, so on such machines pinning becomes a no-op (the
    issue's workaround; it changes no numbers, only where the copies would have gone)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def calibration_dataset(samples):
    """Our token tensors as the pre-tokenized `datasets.Dataset` oneshot accepts as-is."""
    from datasets import Dataset

    ids = [s.tolist() for s in samples]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})


@contextlib.contextmanager
def running_ppl(record: list[float]):
    """Record the running perplexity that `qingzhou.eval.perplexity.perplexity` reports to its
    progress bar after every window, so one 40-window pass also gives the 10- and 20-window
    numbers that shorter runs of our benchmarks print (same code, no second pass)."""
    import qingzhou.eval.perplexity as P

    @contextlib.contextmanager
    def recorder(total: int, label: str, *, enabled: bool = True):
        yield lambda n=1, status="": record.append(float(status.split()[-1]))

    saved, P.progress_bar = P.progress_bar, recorder
    try:
        yield record
    finally:
        P.progress_bar = saved


def linear_sparsity(model) -> float:
    """Fraction of exact zeros over the decoder's Linear weights (lm_head excluded, as pruned)."""
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)


def point_config_at_folder(model, folder: str) -> None:
    """oneshot re-reads `config.name_or_path` from disk to refuse already-quantized checkpoints;
    a GGUF-loaded model names the GGUF's package folder, which has no config.json. Saving the
    (dequantised, dense) config to `folder` and pointing at it gives that check what it expects."""
    model.config.save_pretrained(folder)
    model.config._name_or_path = folder


def compress(model, tok, samples, s: PeerSetting) -> float:
    """Apply setting `s` in place through llm-compressor's oneshot; return its wall time (s)."""
    import tempfile

    from llmcompressor import oneshot

    modifiers = RECIPES[s.kind](s)
    with tempfile.TemporaryDirectory() as folder:
        point_config_at_folder(model, folder)
        t0 = time.perf_counter()
        oneshot(model=model, tokenizer=tok, recipe=modifiers, dataset=calibration_dataset(samples),
                num_calibration_samples=len(samples), max_seq_length=SEQ_LEN_CALIB,
                shuffle_calibration_samples=False, batch_size=1)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", required=True, help="comma-separated, e.g. llmc-gptq-asym-4,llmc-wanda-50")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-rows", type=int, default=100000, help="at most this many calibration rows (all 82)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--expect-calib-sha", default=None, help="refuse to run unless our calibration tokens match")
    ap.add_argument("--expect-eval-sha", default=None, help="refuse to run unless our evaluation windows match")
    ap.add_argument("--out", default=None, help="write the rows here (JSON lines, overwritten)")
    ap.add_argument("--append", default=None, help="also append the rows to this JSON-lines file")
    args = ap.parse_args()
    settings = [parse_peer_setting(n) for n in args.settings.split(",")]

    import compressed_tensors
    import llmcompressor
    import torch
    import transformers

    from qingzhou.data.calibration import load_calibration
    from qingzhou.data.corpus import load_text
    from qingzhou.eval.perplexity import perplexity, tokenize_windows
    from qingzhou.llm import load_model

    torch.set_num_threads(args.threads)
    allow_cpu_only_awq()
    dense, tok = load_model("smollm2", dtype="float32", device="cpu")
    samples = load_calibration(tok, calibration_config(args.calib_rows))
    text = load_text(str(EVAL_SOURCE))
    calib_sha = fingerprint(samples)
    eval_sha = fingerprint([tokenize_windows(tok, text, SEQ_LEN_EVAL, args.windows)])
    dense_sha = fingerprint(dense.state_dict().values())  # same GGUF dequantisation as under our transformers?
    for what, got, want in (("calibration", calib_sha, args.expect_calib_sha), ("evaluation", eval_sha, args.expect_eval_sha)):
        if want and got != want:
            raise SystemExit(f"{what} tokens differ from the caller's under transformers {transformers.__version__} "
                             f"(sha {got[:12]} != {want[:12]}): the comparison would not be like for like.")
    versions = {"peer": f"llmcompressor {llmcompressor.__version__}", "compressed_tensors": compressed_tensors.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__}
    out = Path(args.out) if args.out else None
    if out:
        out.write_text("")
    for s in settings:
        model = copy.deepcopy(dense)
        row: dict = {"setting": s.name}
        if s.kind != "dense":
            row[s.timing_key] = round(compress(model, tok, samples, s), 1)
            if s.kind in ("sparsegpt", "wanda"):
                row["sparsity"] = round(linear_sparsity(model), 4)
        row["calib_tokens"] = sum(x.numel() for x in samples)
        with running_ppl([]) as by_window:
            res = perplexity(model, tok, text, seq_len=SEQ_LEN_EVAL, max_windows=args.windows, progress=True)
        prefixes = {w: by_window[w - 1] for w in (10, 20) if w < len(by_window)}
        row.update(ppl=round(res.ppl, 3), ppl_s=round(res.seconds, 1), windows=res.windows, ppl_at_windows=prefixes,
                   calib_samples=len(samples),
                   threads=args.threads, calib_sha=calib_sha, eval_sha=eval_sha, dense_sha=dense_sha, **versions)
        line = json.dumps(row)
        print(line, flush=True)
        for path in filter(None, (out, args.append)):
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        del model


if __name__ == "__main__":
    main()
