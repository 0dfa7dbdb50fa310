"""`prune(model, cfg, calib)`: the one public entry point the recipe stage and the CLI call."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qingzhou.compress.calibrate import find_decoder_layers
from qingzhou.compress.driver import run_method, write_outputs
from qingzhou.compress.prune.config import CalibratedPruneConfig, PruneConfig
from qingzhou.compress.prune.masks import Target
from qingzhou.compress.prune.plan import build_plan, layer_index
from qingzhou.compress.prune.registry import PRUNERS, parse_config
from qingzhou.compress.prune.structured import StructuredReport


@dataclass
class PruneReport:
    method: str
    config: dict[str, Any]
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # per pruned linear
    layers: list[dict[str, Any]] = field(default_factory=list)  # per decoder layer
    skipped: list[str] = field(default_factory=list)
    unfed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    owl: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sparsity: float = 0.0  # zeros / weights over the pruned linears
    model_sparsity: float = 0.0  # zeros / parameters over the whole model
    parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def summary(self) -> dict[str, Any]:
        """Headline numbers (what a metrics.json or a CLI table shows)."""
        return {
            "method": self.method, "target": self.config.get("nm") or self.config.get("sparsity"),
            "pruned_linears": len(self.modules), "skipped_linears": len(self.skipped),
            "sparsity": round(self.sparsity, 4), "model_sparsity": round(self.model_sparsity, 4),
            "nonzero_parameters": self.parameters - round(self.model_sparsity * self.parameters),
            "warnings": len(self.warnings), "seconds": round(self.seconds, 2),
            "peak_memory_mb": round(self.calibration.get("peak_memory_mb", 0.0), 1),
        }


def prune(model: nn.Module, cfg: PruneConfig | dict[str, Any], calib: Any = None, *,
          tokenizer: Any = None, output_dir: str | Path | None = None,
          overwrite: bool = False, streaming: bool = False, activations: str = "cpu",
          dtype: str | None = None) -> PruneReport | StructuredReport:
    """Prune the decoder-layer linears of `model` in place and report the sparsity per layer.

    `calib`: calibration samples for calibrated methods (and `owl`) - a list of 1-D token tensors,
    a [N, T] tensor, a list of strings (needs `tokenizer`), or None to load `cfg.calibration`
    (needs `tokenizer`). Pruned weights are exact zeros in the same dense tensors, so the model
    saves and loads like any other (`qingzhou.llm.save_model`). Returns a `PruneReport`; with
    `method: structured` the model gets smaller instead and a `StructuredReport` comes back.
    Given `output_dir`, the model is saved there with `metrics.json` and `report.json`, as every
    verb saves.

    `streaming=True`: `model` is a Hugging Face folder that need not fit in memory; it is pruned one
    decoder layer at a time into the sharded, resumable `output_dir` (see `quantize` and
    `compress.streaming`; `activations`: cpu | disk, `dtype`: default as stored).
    """
    entry = PRUNERS.get(parse_config(cfg).method, where="prune")
    stream = None
    if streaming:
        from qingzhou.compress.streaming import check_streamable, open_stream

        check_streamable(entry.meta, parse_config(cfg))
        stream = open_stream(model, output_dir, dtype=dtype, activations=activations, overwrite=overwrite)
        model, tokenizer = stream.model, tokenizer if tokenizer is not None else stream.tokenizer
    if entry.meta["reshapes"]:
        report = entry.obj(model, parse_config(cfg), calib, tokenizer=tokenizer)
    else:
        run = run_method(model, cfg, calib, tokenizer, registry=PRUNERS, build_plan=build_plan, where="prune",
                         needs_data=lambda c, e: e.meta["needs_calibration"] or c.owl is not None,
                         before_run=lambda m, c, plan, samples: _apply_owl(m, c, plan, samples) if c.owl else {},
                         require_plan=False, stream=stream)
        report = PruneReport(method=run.cfg.method, config=run.cfg.model_dump(mode="json"), skipped=run.skipped,
                             warnings=run.warnings, owl=run.extra, calibration=run.result.get("calibration", {}),
                             seconds=run.seconds)
        report.unfed = list(report.calibration.get("unfed", []))
        if stream is None:
            counts = _linear_counts(model, run.plan)
            params = list({id(p): p for p in model.parameters()}.values())  # tied weights once
            totals = (sum(p.numel() for p in params), sum(int((p == 0).sum()) for p in params))
            _fill_sparsity(report, counts, find_decoder_layers(model)[0], run.plan, run.result.get("modules", {}), totals)
        else:
            report.calibration["resumed_from_layer"] = stream.resumed_from  # layers an interrupted run had done
            _fill_sparsity(report, stream.linear_stats(), range(stream.n_layers), run.plan, stream.modules,
                           stream.totals())
    if stream is not None:
        write_outputs(output_dir, report, lambda folder: stream.commit(model, tokenizer))
    elif output_dir is not None:
        from qingzhou.llm import save_model

        write_outputs(output_dir, report, lambda folder: save_model(model, tokenizer, folder, overwrite=overwrite))
    return report


def _apply_owl(model: nn.Module, cfg: PruneConfig, plan: dict[str, Target], samples: Any) -> dict[str, Any]:
    """Replace the global sparsity of every non-overridden linear by its layer's OWL sparsity."""
    from qingzhou.compress.prune.owl import outlier_ratios, owl_sparsities

    assert isinstance(cfg, CalibratedPruneConfig) and cfg.owl is not None
    ratios = outlier_ratios(model, plan, samples, cfg, cfg.owl)
    per_layer = owl_sparsities(ratios, cfg.sparsity, cfg.owl.spread)
    for name, target in plan.items():
        i = layer_index(name)
        if target.nm is None and target.sparsity == cfg.sparsity and i in per_layer:
            plan[name] = replace(target, sparsity=per_layer[i])
    return {"outlier_ratio": ratios, "layer_sparsity": per_layer}


@torch.no_grad()
def _linear_counts(model: nn.Module, plan: dict[str, Target]) -> dict[str, dict[str, Any]]:
    """Zeros actually present (not what was asked for) in each planned linear of `model`."""
    modules = dict(model.named_modules())
    return {name: {"zeros": int((modules[name].weight == 0).sum()), "numel": modules[name].weight.numel(),
                   "shape": list(modules[name].weight.shape)} for name in plan}


def _fill_sparsity(report: PruneReport, counts: dict[str, dict[str, Any]], layers: Any, plan: dict[str, Target],
                   results: dict[str, dict[str, Any]], totals: tuple[int, int]) -> None:
    """The report's sparsity per linear, per layer and over the model, from the measured `counts`
    ({name: zeros, numel, shape}) and `totals` (parameters, zeros over the whole model)."""
    per_layer = {i: [0, 0] for i in range(len(layers))}
    zeros_total = weights_total = 0
    for name, target in plan.items():
        zeros, numel = counts[name]["zeros"], counts[name]["numel"]
        entry = {"target": target.describe(), "sparsity": zeros / numel, "shape": list(counts[name]["shape"])}
        entry.update(results.get(name, {}))
        report.modules[name] = entry
        i = layer_index(name)
        per_layer[i][0] += zeros
        per_layer[i][1] += numel
        zeros_total += zeros
        weights_total += numel
    report.layers = [{"layer": i, "sparsity": z / n if n else 0.0, "weights": n}
                     for i, (z, n) in per_layer.items()]
    report.sparsity = zeros_total / weights_total if weights_total else 0.0
    report.parameters = totals[0]
    report.model_sparsity = totals[1] / max(report.parameters, 1)
