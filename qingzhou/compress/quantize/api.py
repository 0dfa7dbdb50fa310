"""`quantize(model, cfg, calib)`: the one public entry point the recipe stage and the CLI call."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qingzhou.compress.quantize.config import CalibratedConfig, QuantizeConfig
from qingzhou.compress.quantize.plan import resolve_plan
from qingzhou.compress.quantize.qlinear import QuantLinear
from qingzhou.compress.quantize.registry import load_quantizers, parse_config

QUANT_ATTR = "qingzhou_quantization"  # model attribute holding the quantization_config to save


@dataclass
class QuantizeReport:
    method: str
    config: dict[str, Any]
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    unfed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    linear_bytes_before: int = 0
    linear_bytes_after: int = 0
    packed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def group_size_fallbacks(self) -> dict[str, int]:
        """Group size used per module where the requested one did not divide its width."""
        return {name: m["group_size"] for name, m in self.modules.items() if "group_size_requested" in m}

    def summary(self) -> dict[str, Any]:
        """Headline numbers (what a metrics.json or a CLI table shows)."""
        return {
            "method": self.method, "bits": self.config.get("bits"), "group_size": self.config.get("group_size"),
            "sym": self.config.get("sym"), "quantized_linears": len(self.modules),
            "skipped_linears": len(self.skipped), "unfed_linears": len(self.unfed),
            "group_size_fallbacks": len(self.group_size_fallbacks()),
            "warnings": len(self.warnings), "seconds": round(self.seconds, 2),
            "linear_mb_before": round(self.linear_bytes_before / 2**20, 3),
            "linear_mb_after": round(self.linear_bytes_after / 2**20, 3),
            "peak_memory_mb": round(self.calibration.get("peak_memory_mb", 0.0), 1),
        }


def quantize(
    model: nn.Module, cfg: QuantizeConfig | dict[str, Any], calib: Any = None, *, tokenizer: Any = None,
) -> QuantizeReport:
    """Quantise the decoder-layer linears of `model` in place and report what happened.

    `calib`: calibration samples for calibrated methods - a list of 1-D token tensors, a [N, T]
    tensor, a list of strings (needs `tokenizer`), or None to load `cfg.calibration` (needs
    `tokenizer`). With `cfg.pack` (default) the linears become `QuantLinear` modules holding the
    GPTQ-layout tensors (save with `save_quantized`); otherwise they stay dense, fake-quantised.
    """
    cfg = parse_config(cfg)
    spec = load_quantizers()[cfg.method]
    plan, skipped, requested = resolve_plan(model, cfg)
    if not plan:
        from qingzhou.errors import RecipeError

        raise RecipeError("no full-precision nn.Linear left to quantise in the decoder layers "
                          f"({len(skipped)} skipped).", where="quantize",
                          hint="The model may already be quantised, or `skip` matches every linear.")
    samples = _calibration_samples(calib, cfg, tokenizer) if spec.needs_calibration else None
    modules = dict(model.named_modules())
    before = sum(_linear_bytes(modules[n]) for n in plan)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = spec.run(model, cfg, plan, samples)
    for w in caught:  # re-emit for the caller, keep the text for the report
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    report = QuantizeReport(method=cfg.method, config=cfg.model_dump(mode="json"), skipped=skipped,
                            warnings=[str(w.message) for w in caught], packed=cfg.pack,
                            calibration=result.get("calibration", {}))
    report.unfed = list(report.calibration.get("unfed", []))
    quantized = {name: r.pop("quantized") for name, r in result["modules"].items() if "quantized" in r}
    for name, r in result["modules"].items():
        s = plan[name]
        report.modules[name] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, **r}
        if name in requested:  # on_indivisible_group changed it (also in quantization_config.dynamic)
            report.modules[name]["group_size_requested"] = requested[name]
    report.linear_bytes_before = before
    if "linear_bytes_after" in result:  # the method installed its own layers (bitsandbytes)
        report.linear_bytes_after = result["linear_bytes_after"]
    elif cfg.pack:
        for name, qw in quantized.items():
            old = modules[name]
            new = QuantLinear.from_quantized(qw, old.bias).to(old.weight.device)
            model.set_submodule(name, new)
            report.linear_bytes_after += sum(t.numel() * t.element_size() for t in new.buffers())
    else:
        report.linear_bytes_after = sum(
            q.codes.numel() * q.scheme.bits // 8 + q.scales.numel() * 2 + q.zeros.numel() * q.scheme.bits // 8
            for q in quantized.values())
    report.seconds = time.perf_counter() - t0
    setattr(model, QUANT_ATTR, result.get("quantization_config") or quantization_config(cfg, plan, skipped))
    return report


def _linear_bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def _calibration_samples(calib: Any, cfg: QuantizeConfig, tokenizer: Any) -> list[torch.Tensor]:
    from qingzhou.data.calibration import calibration_samples

    ccfg = cfg.calibration if isinstance(cfg, CalibratedConfig) else None
    return calibration_samples(calib, ccfg, tokenizer, method=cfg.method, where="quantize")


def quantization_config(cfg: QuantizeConfig, plan: dict[str, Any], skipped: list[str]) -> dict[str, Any]:
    """The `quantization_config` block of config.json as transformers/gptqmodel/vLLM read it.

    Per-module differences go into GPTQModel's `dynamic` map (`-:regex` = not quantised,
    `+:regex` = other bits/group size), which gptqmodel and vLLM both honour.
    """
    import re

    dynamic: dict[str, dict[str, Any]] = {}
    for name in skipped:
        dynamic[f"-:^{re.escape(name)}$"] = {}
    for name, s in plan.items():
        if (s.bits, s.group_size, s.sym) != (cfg.bits, cfg.group_size, cfg.sym):
            dynamic[f"+:^{re.escape(name)}$"] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
    qc: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": bool(getattr(cfg, "act_order", False)),
        "static_groups": bool(getattr(cfg, "static_groups", False)),
        "sym": cfg.sym,
        "true_sequential": bool(getattr(cfg, "true_sequential", True)),
        "damp_percent": float(getattr(cfg, "damp_percent", 0.0)),
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": ["qingzhou"], "method": cfg.method},
    }
    if dynamic:
        qc["dynamic"] = dynamic
    return qc
