"""`bench(model, tokenizer)`: prefill / decode speed, latency and memory, from measured repetitions.

What optimum-benchmark users expect, kept small: for each batch size, warm-up runs, then `repeats`
timed runs of (a) a prefill forward pass over `prompt_tokens` tokens, (b) `generate` of 1 token
(time to first token) and (c) `generate` of `new_tokens` tokens with EOS disabled (fixed length).
Time per output token is the time from the first to the last new token of (c) over new_tokens - 1,
read off a streamer that notes when each token arrives, so prompt processing never inflates the
decode figure and a busy machine cannot make it negative (as the difference (c - b) of two timed
runs could); the static and compiled paths, which must not sync per token, keep (c - b), and where
load makes it non-positive take (c) / new_tokens, prefill included (an upper bound). Every number is a
mean with its sample standard deviation over the repetitions. Memory: peak
device memory (CUDA-like backends) or the process's peak resident set (CPU), weights in memory and on
disk. The decode roofline fraction compares bytes of weights read per step / time per step with a
measured device copy bandwidth.

Generation runs through `qingzhou.llm.generate.decode`, so `fast="auto"` benchmarks the static-cache +
compiled decode path on CUDA (what `generate` uses there) and `fast=False` plain eager `generate`; the
path that actually ran is recorded in `config.decode_path`. The warm-up runs absorb the compile.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class _TokenClock:
    """A `generate` streamer that only notes when each put arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None with a single repetition, never NaN)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _sync(device: str) -> Callable[[], None]:
    import torch

    module = getattr(torch, device.split(":")[0], None)
    if device.startswith("cpu") or module is None or not hasattr(module, "synchronize"):
        return lambda: None
    return module.synchronize


def weights_bytes(model: Any) -> int:
    """Bytes of parameters and buffers as stored (tied weights counted once; packed ints as packed)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def disk_bytes(path: str | Path | None) -> int | None:
    """Size of the weight files of a model folder (safetensors / gguf / bin) or of one file."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        files = [f for f in p.iterdir() if f.suffix in (".safetensors", ".gguf", ".bin", ".pt")]
        return sum(f.stat().st_size for f in files) or None
    return None


def copy_bandwidth(device: str, mib: int = 256, repeats: int = 5) -> float:
    """Measured device-memory copy bandwidth in GB/s (read + write bytes / time), best of `repeats`."""
    import torch

    sync = _sync(device)
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats + 1):  # the first copy is a warm-up (page faults, lazy allocation)
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * mib * 2**20 / best / 1e9


def peak_memory_gib(device: str) -> dict[str, float]:
    """The device layer's peak-memory figure, keyed by what it measures (device allocator or RSS)."""
    from qingzhou.llm.devices import peak_memory_mb, peak_memory_source

    key = "peak_rss_gib" if peak_memory_source(device) == "process peak RSS" else "peak_device_gib"
    return {key: round(peak_memory_mb(device) / 2**10, 4)}


def _prompt_ids(tokenizer: Any, batch: int, length: int, seed: int):
    """Random ordinary tokens (no specials) so every run processes exactly `length` tokens."""
    import torch

    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = len(tokenizer)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    for s in special:
        ids[ids == s] = (s + 1) % vocab
    return ids


def bench(model: Any, tokenizer: Any, *, batch_sizes: Sequence[int] = (1, 8), prompt_tokens: int = 128,
          new_tokens: int = 32, warmup: int = 1, repeats: int = 3, model_path: str | Path | None = None,
          measure_bandwidth: bool = True, bandwidth_mib: int = 256, seed: int = 0,
          progress: bool = True, fast: Any = "auto") -> dict[str, Any]:
    """Speed and memory of `model` on its current device; see the module docstring for the method."""
    import torch

    from qingzhou.llm.devices import env_info, reset_peak_memory
    from qingzhou.llm.generate import decode, fast_status
    from qingzhou.progress import progress_bar

    if new_tokens < 2 or prompt_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError("need new_tokens >= 2, prompt_tokens >= 1, repeats >= 1, warmup >= 0")
    from qingzhou.llm.devices import model_device

    device = str(model_device(model))
    sync = _sync(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def generate(ids, n: int, streamer: Any = None):
        return decode(model, ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id,
                      fast=fast, streamer=streamer)

    # eager and lean decoding sync per token (a clock streamer times them); compiled paths do not
    per_token_clock = fast_status(model, fast) in ("eager", "lean", "lean+native")

    results = []
    reset_peak_memory(device)
    with torch.inference_mode(), progress_bar(len(batch_sizes) * (warmup + repeats), "bench",
                                              enabled=progress) as advance:
        for b in batch_sizes:
            ids = _prompt_ids(tokenizer, b, prompt_tokens, seed).to(device)
            prefill, ttft, total, tpot = [], [], [], []
            for i in range(warmup + repeats):
                p = timed(lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids)))  # noqa: B023 (timed calls it at once)
                t1 = timed(lambda: generate(ids, 1))  # noqa: B023 (timed calls it at once)
                clock = _TokenClock() if per_token_clock else None
                tn = timed(lambda: generate(ids, new_tokens, clock))  # noqa: B023 (timed calls it at once)
                if i >= warmup:
                    prefill.append(p)
                    ttft.append(t1)
                    total.append(tn)
                    span = clock.stamps[-1] - clock.stamps[1] if clock and len(clock.stamps) > 2 else tn - t1
                    # two separately timed calls: on a loaded machine the 1-token call can take longer
                    # than the n-token one; then the whole call's mean (prefill in) bounds the step
                    tpot.append(span / (new_tokens - 1) if span > 0 else tn / new_tokens)
                advance(1, f"batch {b}")
            results.append({
                "batch_size": b,
                "prefill_tokens_per_s": _stats([b * prompt_tokens / t for t in prefill]),
                "decode_tokens_per_s": _stats([b / t for t in tpot]),
                "ttft_ms": _stats([1e3 * t for t in ttft]),
                "tpot_ms": _stats([1e3 * t for t in tpot]),
                "e2e_s": _stats(total),
            })
    memory = {"weights_gib": round(weights_bytes(model) / 2**30, 4),
              "disk_gib": None, **peak_memory_gib(device)}
    size = disk_bytes(model_path or getattr(model, "qingzhou_source", None))
    if size:
        memory["disk_gib"] = round(size / 2**30, 4)
    out: dict[str, Any] = {
        "config": {"batch_sizes": list(batch_sizes), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                   "warmup": warmup, "repeats": repeats, "dtype": str(next(model.parameters()).dtype),
                   "decode_path": fast_status(model, fast)},
        "results": results,
        "memory": memory,
        "env": env_info(device),
    }
    if measure_bandwidth:
        bandwidth = copy_bandwidth(device, mib=bandwidth_mib)
        per_step = weights_bytes(model)
        if out["config"]["decode_path"] == "lean+native":  # the C step reads its own copies (int8 head)
            from qingzhou.llm.quantized import native

            per_step = native.native_model(model).bytes_per_step
        out["roofline"] = {
            "copy_bandwidth_gb_s": round(bandwidth, 2),
            "weights_bytes_per_step": per_step,
            # batch-1 decode reads every weight once per token: the memory-bound ceiling
            "batch1_decode_fraction": round(
                per_step / (results[0]["tpot_ms"]["mean"] / 1e3) / (bandwidth * 1e9), 4)
            if results and results[0]["batch_size"] == 1 else None,
        }
    return out
