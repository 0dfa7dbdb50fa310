"""`quantize(model, cfg, calib)`: the one public entry point the recipe stage and the CLI call."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qingzhou.compress.driver import run_method, write_outputs
from qingzhou.compress.quantize.config import QuantizeConfig
from qingzhou.compress.quantize.plan import resolve_plan
from qingzhou.compress.quantize.registry import QUANTIZERS
from qingzhou.errors import RecipeError
from qingzhou.llm.quantized.gptq_layout import (
    QUANT_ATTR,
    QZEROS_CONVENTION,
    checkpoint_format,
    round_to_storage,
    save_quantized,
)
from qingzhou.llm.quantized.qlinear import QuantLinear
from qingzhou.llm.quantized.runtime import use_fast_head


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
    output_dir: str | Path | None = None, save_format: str = "gptq", gguf_type: str = "q8_0",
    overwrite: bool = False, streaming: bool = False, activations: str = "cpu", dtype: str | None = None,
) -> QuantizeReport:
    """Quantise the decoder-layer linears of `model` in place and report what happened.

    `calib`: calibration samples for calibrated methods - a list of 1-D token tensors, a [N, T]
    tensor, a list of strings (needs `tokenizer`), or None to load `cfg.calibration` (needs
    `tokenizer`). With `cfg.pack` (default) the linears become `QuantLinear` modules holding the
    GPTQ-layout tensors; otherwise they stay dense, fake-quantised. Given `output_dir`, the model
    is saved there (`save_format`: gptq | dense | gguf with `gguf_type` | compressed-tensors) with `metrics.json` and
    `report.json`, as every verb saves (a non-empty `output_dir` only with `overwrite`, and only
    if qingzhou wrote it).

    `streaming=True`: `model` is a Hugging Face folder (safetensors) that need not fit in memory.
    It is built on the meta device and compressed one decoder layer at a time, each layer written
    to its own shard of `output_dir` (required; `save_format` gptq or dense) and released
    (`compress.streaming`); `activations` keeps the calibration activations in RAM (`cpu`) or a
    memory-mapped file (`disk`); `dtype` (default: as stored) is what the layers compute in. Called
    again after an interruption, it resumes at the first unfinished layer with the same result.
    """
    requested: dict[str, int] = {}  # group size asked for, where on_indivisible_group changed it

    def plan_layers(model: nn.Module, cfg: Any) -> tuple[dict[str, Any], list[str]]:
        plan, skipped, changed = resolve_plan(model, cfg)
        requested.update(changed)
        return plan, skipped

    stream = None
    if streaming:
        from qingzhou.compress.streaming import check_streamable, open_stream

        cfg = QUANTIZERS.validate(cfg)
        check_streamable({}, cfg, save_format)
        stream = open_stream(model, output_dir, dtype=dtype, activations=activations, overwrite=overwrite)
        stream.key = {"save_format": save_format}
        # the checkpoint format is fixed before the first layer is written: gptq_v2 when any layer is asymmetric
        v2 = cfg.pack and (not cfg.sym or any(getattr(o, "sym", None) is False for o in cfg.overrides))
        stream.finalize = lambda index, layer, callback: _finalize_layer(
            stream.model, f"{stream.prefix}.{index}.", callback, cfg.pack, v2)
        model, tokenizer = stream.model, tokenizer if tokenizer is not None else stream.tokenizer
    run = run_method(model, cfg, calib, tokenizer, registry=QUANTIZERS, build_plan=plan_layers, where="quantize",
                     stream=stream)
    cfg, plan, result = run.cfg, run.plan, run.result
    if stream is not None:  # every layer's results, those of resumed layers included
        result = {**result, "modules": {n: dict(r) for n, r in stream.modules.items() if n in plan}}
    report = QuantizeReport(method=cfg.method, config=cfg.model_dump(mode="json"), skipped=run.skipped,
                            warnings=run.warnings, packed=cfg.pack, calibration=result.get("calibration", {}))
    report.unfed = list(report.calibration.get("unfed", []))
    if stream is not None:  # layers an interrupted earlier run had finished
        report.calibration["resumed_from_layer"] = stream.resumed_from
    report.linear_bytes_before = run.bytes_before
    quantized = {name: r.pop("quantized") for name, r in result["modules"].items() if "quantized" in r}
    for name, r in result["modules"].items():
        s = plan[name]
        report.modules[name] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, **r}
        if name in requested:  # on_indivisible_group changed it (also in quantization_config.dynamic)
            report.modules[name]["group_size_requested"] = requested[name]
    if "linear_bytes_after" in result:  # the method installed its own layers (bitsandbytes)
        report.linear_bytes_after = result["linear_bytes_after"]
    elif stream is not None:
        report.linear_bytes_after = sum(s.bytes for s in stream.stats.values())
    else:
        report.linear_bytes_after = _pack(model, quantized) if cfg.pack else _codes_bytes(quantized)
        round_to_storage(model, skip={f"{name}.weight" for name in quantized})  # the checkpoint stores 16-bit tensors
        if cfg.pack:
            use_fast_head(model)  # as load_quantized does: the same runtime in memory and reloaded
    report.seconds = run.seconds
    qc = result.get("quantization_config") or quantization_config(cfg, plan, run.skipped)
    setattr(model, QUANT_ATTR, qc)
    if stream is not None:
        extra = {"quantization_config": qc} if cfg.pack else {}
        write_outputs(output_dir, report, lambda folder: stream.commit(model, tokenizer, extra))
    elif output_dir is not None:
        write_outputs(output_dir, report,
                      lambda folder: save_compressed(model, tokenizer, folder, save_format, gguf_type, overwrite=overwrite))
    return report


def _pack(model: nn.Module, quantized: dict[str, Any]) -> int:
    """Replace each linear of `quantized` ({full name: QuantizedWeight}) by its packed `QuantLinear`;
    returns the bytes of the packed tensors."""
    total = 0
    for name, qw in quantized.items():
        old = model.get_submodule(name)
        new = QuantLinear.from_quantized(qw, old.bias).to(old.weight.device)
        model.set_submodule(name, new)
        total += sum(t.numel() * t.element_size() for t in new.buffers())
    return total


def _codes_bytes(quantized: dict[str, Any]) -> int:
    """Bytes the codes, scales and zeros of unpacked (dense fake-quant) linears would take."""
    return sum(q.codes.numel() * q.scheme.bits // 8 + q.scales.numel() * 2 + q.zeros.numel() * q.scheme.bits // 8
               for q in quantized.values())


def _finalize_layer(model: nn.Module, prefix: str, callback: Any, pack: bool, v2: bool = False) -> int:
    """Streaming: the saved form of one finished decoder layer (names under `prefix`). The
    method's codes leave its results here (a model-sized pile otherwise) and, with `pack`, become
    `QuantLinear`s, as `quantize` does for the whole model in memory; returns their bytes. `v2`:
    their qzeros are written in the gptq_v2 convention, as `save_quantized` writes an asymmetric model."""
    from qingzhou.llm.quantized.gptq_layout import qzeros_v1_to_v2

    results = getattr(callback, "results", {})
    quantized = {n: r.pop("quantized") for n, r in results.items() if n.startswith(prefix) and "quantized" in r}
    if not pack:
        return _codes_bytes(quantized)
    total = _pack(model, quantized)
    for name in quantized if v2 else ():
        q = model.get_submodule(name)
        q.qzeros.copy_(qzeros_v1_to_v2(q.qzeros, q.bits, q.out_features))
        q.qzeros_v2 = True
    return total


def save_compressed(model: nn.Module, tokenizer: Any, folder: str | Path, save_format: str = "gptq",
                    gguf_type: str = "q8_0", *, overwrite: bool = False) -> Path:
    """Save a (quantised) model as a GPTQ-layout folder, a dense folder, `folder/model.gguf`, or a
    compressed-tensors folder (vLLM's preferred layout; also for 2:4-pruned models), atomically (a non-empty `folder` only with `overwrite`, and only if qingzhou wrote it)."""
    if save_format == "gptq":
        return save_quantized(model, tokenizer, folder, overwrite=overwrite)
    if save_format == "dense":
        from qingzhou.llm import save_model

        return save_model(model, tokenizer, folder, overwrite=overwrite)
    if save_format == "gguf":
        from qingzhou.compress.quantize.formats.gguf import export_gguf
        from qingzhou.io import atomic_dir

        with atomic_dir(folder, overwrite=overwrite, what="gguf export") as tmp:
            export_gguf(model, tokenizer, tmp / "model.gguf", gguf_type)
        return Path(folder)
    if save_format == "compressed-tensors":
        from qingzhou.compress.quantize.formats.compressed_tensors import export_compressed_tensors
        from qingzhou.io import atomic_dir

        with atomic_dir(folder, overwrite=overwrite, what="compressed-tensors model") as tmp:
            export_compressed_tensors(model, tokenizer, tmp)
        return Path(folder)
    raise RecipeError(f"unknown save format {save_format!r}.", where="save_format",
                      hint="Valid: gptq, dense, gguf, compressed-tensors.")


def quantization_config(cfg: QuantizeConfig, plan: dict[str, Any], skipped: list[str]) -> dict[str, Any]:
    """The `quantization_config` block of config.json as transformers/gptqmodel/vLLM read it.

    Per-module differences go into GPTQModel's `dynamic` map (`-:regex` = not quantised,
    `+:regex` = other bits/group size), which gptqmodel and vLLM both honour. The global fields
    are the configured scheme, unless no layer uses it (every layer fell back to another group
    size): then the most common one, since GPTQModel checks the global group size against its
    kernels before it applies `dynamic` (48 is refused even when no layer uses it).

    What the loaders check, and why the block looks as it does:
    * `damp_percent` only where damping was used (GPTQ, AWQ's gptq solver) and inside (0, 1):
      transformers' `GPTQConfig` and GPTQModel refuse anything else ("damp_percent must between
      0 and 1"), while both fill in their own default when it is absent. The value actually
      configured also goes to `meta.damp_percent`, where GPTQModel itself records it;
    * `checkpoint_format` names the zero-point convention (`gptq_layout.checkpoint_format`):
      `gptq` (v1, `qzeros` holds `zero - 1`) when every layer is symmetric, `gptq_v2` (`qzeros`
      holds `zero`) otherwise, because GPTQModel refuses asymmetric v1 files it did not write.
      `meta.qzeros_convention` states it in words (a top-level `zero_point` would mean AWQ's "not
      sym");
    * `meta.quantizer` follows the `tool:version` form GPTQModel and optimum write.
    """
    import re

    from qingzhou._version import __version__

    from collections import Counter

    schemes = Counter((s.bits, s.group_size, s.sym) for s in plan.values())
    base = (cfg.bits, cfg.group_size, cfg.sym)
    if schemes and base not in schemes:  # e.g. group_size 48 where every layer fell back to 32: the
        base = schemes.most_common(1)[0][0]  # global fields must name a scheme loaders can build
    bits, group_size, sym = base
    dynamic: dict[str, dict[str, Any]] = {}
    for name in skipped:
        dynamic[f"-:^{re.escape(name)}$"] = {}
    for name, s in plan.items():
        if (s.bits, s.group_size, s.sym) != base:
            dynamic[f"+:^{re.escape(name)}$"] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
    meta: dict[str, Any] = {"quantizer": [f"qingzhou:{__version__}"], "method": cfg.method}
    qc: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": bool(getattr(cfg, "act_order", False)),
        "static_groups": bool(getattr(cfg, "static_groups", False)),
        "sym": sym,
        "true_sequential": bool(getattr(cfg, "true_sequential", True)),
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": meta,
    }
    damp = _damping(cfg)
    if damp is not None:
        meta["damp_percent"] = damp
        if 0 < damp < 1:
            qc["damp_percent"] = damp
    if dynamic:
        qc["dynamic"] = dynamic
    fmt = checkpoint_format(qc)
    qc["checkpoint_format"] = fmt
    meta["qzeros_convention"] = QZEROS_CONVENTION[fmt]
    return qc


def _damping(cfg: QuantizeConfig) -> float | None:
    """The Hessian damping `cfg` quantised with, or None for methods that use none (RTN, AWQ's
    own clip search): a method's config names it `damp_percent`, and a `solver` other than
    "gptq" (AWQ's default) does not use it."""
    damp = getattr(cfg, "damp_percent", None)
    if damp is None or getattr(cfg, "solver", "gptq") != "gptq":
        return None
    return float(damp)
