"""Run 2:4-pruned linears on NVIDIA's sparse tensor cores, but only where that is measured faster.

2:4 sparsity halves a weight's multiply-adds, yet torch's semi-structured path is often *slower*
than dense fp16/bf16 (issue 7 measured 20x slower at 1 row and 3.8x at 2,048 rows for a
14336x4096 layer on an H100): small row counts are padded, the tensor-subclass dispatch costs
Python time per call, and the default cuSPARSELt algorithm is not tuned to the shape. So
`sparsify_24` never converts blindly. For each distinct (shape, dtype) it times, on the model's own
GPU, dense `F.linear` against every available 2:4 path at the row counts you care about
(`rows`: 1 for decoding, 2048 for prefill/batched serving), checks each path's output against
dense, and converts the layers of that shape to the fastest path only if it beats dense by
`min_speedup` at every row count; otherwise the layers stay dense and the report says why.

Paths (`backends`):
* `cusparselt`        - `to_sparse_semi_structured` (cuSPARSELt), algorithm chosen by
                        `torch._cslt_sparse_mm_search` for the shape;
* `cutlass`           - `to_sparse_semi_structured` with `_FORCE_CUTLASS` (CUTLASS kernels);
* `cusparselt-direct` - our `Sparse24Linear` calling `torch._cslt_sparse_mm` itself (no tensor
                        subclass dispatch per call; matters at decode-sized inputs);
* `cutlass-direct`    - `Sparse24Linear` calling `torch._sparse_semi_structured_linear`.

On CPU (or a GPU older than Ampere) it is a no-op that says so in the report. Converted layers are
an inference-time representation: save the model before converting (the zeros are in the
ordinary weights) and convert again after loading.
"""
from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qingzhou.errors import ModelLoadError

Backend = Literal["cusparselt", "cutlass", "cusparselt-direct", "cutlass-direct"]
BACKENDS: tuple[str, ...] = ("cusparselt", "cutlass", "cusparselt-direct", "cutlass-direct")
PAD_ROWS = 8  # both kernels want the dense operand's row count padded to a multiple of 8 (fp16/bf16)
# (GPU major compute capability, dtype, kernel family) -> a fault seen there that ends the process's
# CUDA context, so the path is not even tried (`allow_known_faults` tries it anyway)
KNOWN_FAULTS = {
    (9, torch.float16, "cusparselt"): "cuSPARSELt with fp16 hit 'illegal instruction' on an H200 (sm90, torch 2.11, "
                                      "cuSPARSELt 0.8.0), which kills the process's CUDA context; bf16 ran",
}


class Sparse24Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[int] = Field(default_factory=lambda: [2048], min_length=1,
                            description="token rows per matmul the decision is measured at "
                                        "(1: decoding, 2048: prefill / batched serving)")
    backends: list[Backend] = Field(default_factory=lambda: list(BACKENDS))
    min_speedup: float = Field(1.05, ge=0, description="convert only if the best path is at least this much "
                                                       "faster than dense at every row count (0: always convert)")
    skip: list[str] = Field(default_factory=lambda: [r"lm_head", r"embed"])
    strict: bool = Field(True, description="a targeted linear that is not 2:4 is an error (else it stays dense)")
    warmup: int = Field(5, ge=0)
    iters: int = Field(30, ge=1)
    tolerance: float = Field(2e-2, gt=0, description="max |sparse - dense| / max |dense| accepted from a path")
    allow_known_faults: bool = Field(False, description="also try paths listed in KNOWN_FAULTS for this GPU")


@dataclass
class Sparse24Report:
    device: str
    converted: dict[str, str] = field(default_factory=dict)  # linear -> path
    dense: dict[str, str] = field(default_factory=dict)  # linear -> why it stays dense
    shapes: list[dict[str, Any]] = field(default_factory=list)  # per (out, in, dtype): timings and decision
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def summary(self) -> dict[str, Any]:
        return {"device": self.device, "converted": len(self.converted), "left_dense": len(self.dense),
                "paths": sorted(set(self.converted.values())), "notes": self.notes,
                "seconds": round(self.seconds, 2)}


def check_24(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise a clear error unless every 4 consecutive input weights of each row hold <= 2 non-zeros."""
    rows, cols = weight.shape
    if cols % 4:
        raise ModelLoadError(f"{name} has {cols} input columns, not a multiple of 4, so it cannot be 2:4.",
                             where=name, hint="Leave it dense (add it to `skip`).")
    nonzero = (weight.detach().reshape(rows, cols // 4, 4) != 0).sum(dim=2)
    bad = int((nonzero > 2).sum())
    if bad:
        raise ModelLoadError(f"{name} is not 2:4 sparse: {bad} of {nonzero.numel()} groups of 4 weights hold "
                             f"more than 2 non-zeros.", where=name,
                             hint="Prune it first (`qingzhou prune --nm 2:4`, or `nm: '2:4'`), or skip it.")


class Sparse24Linear(nn.Module):
    """A 2:4 linear calling the sparse kernel directly: rows padded to 8, no tensor-subclass dispatch."""

    def __init__(self, linear: nn.Linear, backend: str, alg_id: int = 0):
        super().__init__()
        w = linear.weight.detach().contiguous()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.backend, self.alg_id = backend, alg_id
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        if backend == "cusparselt-direct":
            self.register_buffer("packed", torch._cslt_compress(w))
            self.register_buffer("meta", None)  # cuSPARSELt keeps its metadata inside `packed`
        else:
            from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

            packed, meta = sparse_semi_structured_from_dense_cutlass(w)
            self.register_buffer("packed", packed)
            self.register_buffer("meta", meta)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, backend={self.backend}, alg_id={self.alg_id}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        n = x2d.shape[0]
        pad = (-n) % PAD_ROWS
        if pad:
            x2d = F.pad(x2d, (0, 0, 0, pad))
        if self.backend == "cusparselt-direct":
            y = torch._cslt_sparse_mm(self.packed, x2d.t(), bias=self.bias, transpose_result=True, alg_id=self.alg_id)
        else:
            y = torch._sparse_semi_structured_linear(x2d, self.packed, self.meta, bias=self.bias)
        return y[:n].reshape(*shape[:-1], self.out_features)


@contextlib.contextmanager
def _force_cutlass(on: bool):
    from torch.sparse import SparseSemiStructuredTensor

    before = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = on
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = before


def _cslt_alg(weight: torch.Tensor, rows: int) -> int:
    """cuSPARSELt's fastest algorithm id for this weight at `rows` input rows (0 if search fails)."""
    x = torch.randn(rows + (-rows) % PAD_ROWS, weight.shape[1], device=weight.device, dtype=weight.dtype)
    try:
        return int(torch._cslt_sparse_mm_search(torch._cslt_compress(weight.contiguous()), x.t(),
                                                transpose_result=True))
    except (RuntimeError, AttributeError):
        return 0


def build_path(linear: nn.Linear, backend: str, rows: int) -> tuple[nn.Module, dict[str, Any]]:
    """A module computing `linear` with 2:4 `backend` (raises if the kernel refuses the shape/dtype)."""
    from torch.sparse import to_sparse_semi_structured

    info: dict[str, Any] = {}
    w = linear.weight.detach().contiguous()
    if backend in ("cusparselt", "cusparselt-direct"):
        info["alg_id"] = _cslt_alg(w, rows)
    if backend.endswith("-direct"):
        return Sparse24Linear(linear, backend, info.get("alg_id", 0)), info
    alg = info.get("alg_id", 0)
    takes_alg = "alg_id" in inspect.signature(to_sparse_semi_structured).parameters  # torch >= 2.12
    with _force_cutlass(backend == "cutlass"), torch.no_grad():
        sparse = to_sparse_semi_structured(w, **({"alg_id": alg} if takes_alg else {}))
    if not takes_alg and hasattr(sparse, "alg_id_cusparselt"):
        sparse.alg_id_cusparselt = alg
    new = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    new.weight = nn.Parameter(sparse, requires_grad=False)
    new.bias = linear.bias
    return new, info


def time_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream (events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def known_faults(device: torch.device, dtype: torch.dtype, backends: list[str]) -> dict[str, str]:
    """The backends that KNOWN_FAULTS rules out on this GPU and dtype, with the reason."""
    if device.type != "cuda":
        return {}
    major = torch.cuda.get_device_capability(device)[0]
    return {p: f"skipped: {why}" for (cc, dt, family), why in KNOWN_FAULTS.items()
            if cc == major and dt == dtype for p in backends if p.startswith(family)}


def measure_paths(linear: nn.Linear, cfg: Sparse24Config) -> dict[str, Any]:
    """Time dense and every 2:4 path of `cfg.backends` on `linear` at each of `cfg.rows`, checking
    each path's output against dense. Returns {rows: {path: ms}, errors: {path: why}, info: {...}}."""
    w, b = linear.weight.detach(), linear.bias
    result: dict[str, Any] = {"ms": {}, "errors": {}, "info": {}}
    if not cfg.allow_known_faults:
        result["errors"].update(known_faults(w.device, w.dtype, cfg.backends))
    with torch.no_grad():
        for rows in cfg.rows:
            x = torch.randn(rows, linear.in_features, device=w.device, dtype=w.dtype)
            ref = F.linear(x, w, b)
            timings = {"dense": time_ms(lambda: F.linear(x, w, b), cfg.warmup, cfg.iters)}  # noqa: B023 (called at once)
            for backend in cfg.backends:
                if backend in result["errors"]:
                    continue
                try:
                    module, info = build_path(linear, backend, rows)
                    err = float((module(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                    if not err <= cfg.tolerance:
                        raise ValueError(f"output differs from dense by {err:.3g} (relative), over {cfg.tolerance}")
                    timings[backend] = time_ms(lambda m=module: m(x), cfg.warmup, cfg.iters)  # noqa: B023 (called at once)
                    result["info"].setdefault(backend, {})[rows] = info
                except (RuntimeError, ValueError, NotImplementedError, AttributeError, TypeError) as e:
                    result["errors"][backend] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    timings.pop(backend, None)
            result["ms"][rows] = timings
    return result


def decide(measured: dict[str, Any], cfg: Sparse24Config) -> tuple[str | None, str]:
    """The path to use (None: stay dense) and why: the path whose *worst* speed-up over the row
    counts is largest, if that worst case reaches `min_speedup`."""
    candidates = [p for p in cfg.backends if all(p in t for t in measured["ms"].values())]
    if not candidates:
        return None, "no 2:4 path ran: " + "; ".join(f"{p}: {e}" for p, e in measured["errors"].items())

    def worst(path: str) -> float:
        return min(t["dense"] / t[path] for t in measured["ms"].values())

    best = max(candidates, key=worst)
    speedups = ", ".join(f"{r} rows {t['dense'] / t[best]:.2f}x" for r, t in measured["ms"].items())
    if worst(best) >= cfg.min_speedup:
        return best, f"{best} faster than dense ({speedups})"
    return None, f"dense faster: best 2:4 path {best} at {speedups} (needs >= {cfg.min_speedup}x at every row count)"


def sparsify_24(model: nn.Module, cfg: Sparse24Config | dict[str, Any] | None = None) -> Sparse24Report:
    """Convert the 2:4-pruned decoder linears of `model` to the fastest measured 2:4 kernel where it
    beats dense (see the module doc). Returns a report naming each linear's path or why it stayed
    dense; on CPU or pre-Ampere GPUs nothing changes and the report says so."""
    from qingzhou.compress.calibrate import select_linears

    cfg = cfg if isinstance(cfg, Sparse24Config) else Sparse24Config.model_validate(cfg or {})
    t0 = time.perf_counter()
    linears, skipped = select_linears(model, cfg.skip, [])
    device = linears[0][1].weight.device if linears else torch.device("cpu")
    report = Sparse24Report(device=str(device))
    targets = []
    for name, lin, _ in linears:
        try:
            check_24(lin.weight, name)
            targets.append((name, lin))
        except ModelLoadError as e:
            if cfg.strict:
                raise
            report.dense[name] = e.message
    if device.type != "cuda":
        report.notes.append(f"no CUDA device (weights on {device.type}): 2:4 sparse kernels need an NVIDIA GPU "
                            "(Ampere or newer); the model is left dense.")
        report.dense.update({name: "not on CUDA" for name, _ in targets})
        return _finish(report, t0)
    if torch.cuda.get_device_capability(device) < (8, 0):
        report.notes.append(f"{torch.cuda.get_device_name(device)} is older than Ampere (sm80): no sparse tensor "
                            "cores; the model is left dense.")
        report.dense.update({name: "GPU older than sm80" for name, _ in targets})
        return _finish(report, t0)
    decisions: dict[tuple, tuple[str | None, str, dict[str, Any]]] = {}
    for name, lin in targets:
        key = (lin.out_features, lin.in_features, str(lin.weight.dtype), lin.bias is not None)
        if key not in decisions:
            measured = measure_paths(lin, cfg)
            path, why = decide(measured, cfg)
            decisions[key] = (path, why, measured)
            report.shapes.append({"out": key[0], "in": key[1], "dtype": key[2], "path": path, "why": why,
                                  "ms": measured["ms"], "errors": measured["errors"], "info": measured["info"]})
        path, why, _ = decisions[key]
        if path is None:
            report.dense[name] = why
            continue
        module, _ = build_path(lin, path, max(cfg.rows))
        model.set_submodule(name, module)
        report.converted[name] = path
    return _finish(report, t0)


def _finish(report: Sparse24Report, t0: float) -> Sparse24Report:
    report.seconds = time.perf_counter() - t0
    return report
