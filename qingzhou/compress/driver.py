"""The compression driver `quantize()` and `prune()` share: parse, plan, samples, run, report, save.

Every weight-rewriting method follows the same steps, so they are written once here:
1. validate the config once through the method registry (a typed config passes through);
2. build the per-linear plan (which linears, with which settings; the rest are skipped);
3. load calibration samples only if the method (or an option such as OWL) needs them;
4. run the method under captured warnings (re-emitted for the caller, kept for the report), timed;
5. given `output_dir`, write the artifact and its numbers the same way for every verb
   (`write_outputs`): the model folder, `metrics.json` (headline numbers) and `report.json`.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qingzhou.errors import RecipeError
from qingzhou.registry import Entry, Registry


class Report(Protocol):
    """What every verb returns: all of its numbers (`to_dict`, report.json) and the headline ones
    (`summary`, metrics.json and the CLI table). The reports of quantize, prune (both the in-place
    report and structured pruning's shape report, whose numbers differ), moefy, finetune and
    distill all follow it."""

    def to_dict(self) -> dict[str, Any]: ...

    def summary(self) -> dict[str, Any]: ...


@dataclass
class MethodRun:
    """What one method run produced, for the verb to turn into its report."""

    cfg: Any
    entry: Entry[Any]
    plan: dict[str, Any]
    skipped: list[str]
    samples: Any = None
    result: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # what `before_run` returned (e.g. OWL ratios)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_before: int = 0  # parameter bytes of the planned modules before the method ran


def run_method(model: Any, cfg: Any, calib: Any, tokenizer: Any, *, registry: Registry[Any],
               build_plan: Callable[[Any, Any], tuple[dict[str, Any], list[str]]], where: str,
               needs_data: Callable[[Any, Entry[Any]], bool] | None = None,
               before_run: Callable[[Any, Any, dict[str, Any], Any], dict[str, Any]] | None = None,
               require_plan: bool = True, stream: Any = None) -> MethodRun:
    """Steps 1-4 above. `needs_data(cfg, entry)` overrides the entry's `needs_calibration`;
    `before_run(model, cfg, plan, samples)` runs inside the captured-warnings block first;
    `require_plan`: an empty plan (nothing left to compress) is a user error. `stream`: a
    `compress.streaming.LayerStream` (the model is on the meta device): calibrated methods walk its
    layers through the engine, data-free ones run on one materialised layer at a time."""
    cfg = registry.validate(cfg)
    entry = registry.get(cfg.method, where=where)
    if stream is not None:
        from qingzhou.compress.streaming import check_streamable

        check_streamable(entry.meta, cfg)
    plan, skipped = build_plan(model, cfg)
    if require_plan and not plan:
        raise RecipeError(f"no full-precision nn.Linear left to {where} in the decoder layers "
                          f"({len(skipped)} skipped).", where=where,
                          hint="The model may already be compressed, or `skip` matches every linear.")
    wants = needs_data(cfg, entry) if needs_data else entry.meta.get("needs_calibration", True)
    samples = calibration_samples(calib, cfg, tokenizer, where) if wants else None
    if stream is not None:
        from qingzhou.compress.streaming import samples_digest

        stream.bind({"method": cfg.model_dump(mode="json"), **stream.key,
                     "samples": samples_digest(samples) if samples is not None else None})
    run = MethodRun(cfg, entry, plan, skipped, samples)
    modules = dict(model.named_modules())
    run.bytes_before = sum(p.numel() * p.element_size() for n in plan for p in modules[n].parameters())
    del modules  # it would keep every replaced linear (and, streaming, its materialised weight) alive
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if before_run is not None:
            run.extra = before_run(model, cfg, plan, samples)
        run.result = _run_entry(entry, model, cfg, plan, samples, stream)
    for w in caught:  # re-emit for the caller, keep the text for the report
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    run.warnings = [str(w.message) for w in caught]
    run.seconds = time.perf_counter() - t0
    return run


def _run_entry(entry: Entry[Any], model: Any, cfg: Any, plan: dict[str, Any], samples: Any, stream: Any) -> dict[str, Any]:
    if stream is None:
        return entry.obj(model, cfg, plan, samples)
    from qingzhou.compress.streaming import run_per_layer, streaming_layers

    if samples is None:  # data-free: not an engine callback, so one layer at a time here
        return run_per_layer(stream, plan, lambda sub: entry.obj(model, cfg, sub, None))
    with streaming_layers(stream):
        return entry.obj(model, cfg, plan, samples)


def calibration_samples(calib: Any, cfg: Any, tokenizer: Any, where: str) -> list[Any]:
    """Calibration token tensors from whatever the caller passed: token tensors, an [N, T] tensor,
    strings (with `tokenizer`), or None to load `cfg.calibration` (with `tokenizer`)."""
    from qingzhou.data.calibration import calibration_samples as samples

    return samples(calib, getattr(cfg, "calibration", None), tokenizer, method=cfg.method, where=where)


def write_outputs(output_dir: str | Path, report: Report, write_model: Callable[[Path], Any]) -> Path:
    """The one way a verb saves: the model (by `write_model(folder)`, which writes atomically),
    then `metrics.json` (the report's headline numbers) and `report.json` (all of it) beside it."""
    from qingzhou.io import atomic_write_json

    output_dir = Path(output_dir)
    write_model(output_dir)
    atomic_write_json(output_dir / "report.json", report.to_dict())
    atomic_write_json(output_dir / "metrics.json", report.summary())
    return output_dir
