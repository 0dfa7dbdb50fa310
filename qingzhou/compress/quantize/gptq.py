"""GPTQ: Hessian-aware rounding, one decoder layer at a time (the solver is in `gptq_solver.py`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from qingzhou.compress.quantize.config import CalibratedConfig
from qingzhou.compress.quantize.registry import register_quantizer

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from qingzhou.llm.quantized.grid import QuantScheme


class GPTQConfig(CalibratedConfig):
    """Defaults measured on SmolLM2 4-bit g64 (WikiText-2, 20 windows; llm-compressor's GPTQ 24.64):
    static groups + Hessian-weighted clip 23.56, static + plain clip 24.80, dynamic + Hessian clip
    24.15, dynamic + plain clip 24.92, dynamic min/max 25.16. `dense_target` on SmolLM2 3-bit g64
    (10 windows): 0 31.51, 0.25 29.44, 0.5 29.22, 1 32.68 (the full step overfits the calibration
    tokens; `compress/dense_target.py`). Scale refit (`compress/quantize/scale_refit.py`), 40 windows:
    3-bit g64 30.04 -> 29.45, 4-bit g64 22.39 -> 22.51 (it fits the calibration tokens a little
    too well at 4 bits), so `refit_max_bits` is 3; quantize time unchanged within noise."""

    method: Literal["gptq"] = "gptq"
    damp_percent: float = Field(0.01, ge=0, le=1, description="damping as a fraction of mean(diag H); "
                                                              "raised x10 automatically on Cholesky failure")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    act_order: bool = Field(True, description="quantise columns in decreasing Hessian diagonal (desc_act)")
    static_groups: bool = Field(True, description="fix every group's grid from the original weights before the "
                                                  "column loop (trivial g_idx, as llm-compressor); false: when the "
                                                  "loop reaches the group, on the error-updated weights")
    hessian_clip: bool = Field(True, description="weigh each column's error in the clip search (clip_search) by "
                                                 "its Hessian diagonal, i.e. by the output error it causes")
    dense_target: float = Field(0.5, ge=0, le=1, description="move each linear's target this fraction of the way "
                                "toward the dense model's outputs (asymmetric calibration, GPTQv2/GPTAQ; "
                                "0: off, GPTQ's own target); costs one more layer forward and one more "
                                "[in, in] product per input")
    refit_max_bits: int = Field(3, ge=0, le=8, description="after the column loop, refit the fp16 group scales of "
                                "linears with at most this many bits to the codes GPTQ chose (least squares on "
                                "the output error; codes and zeros unchanged); 0: never")
    block_tune_steps: int = Field(0, ge=0, description="after GPTQ rounds a decoder layer, train its group "
                                  "scales (and codes, if block_tune_lr > 0) this many Adam steps against the layer's output (block tuning, "
                                  "`compress/quantize/block_tune.py`; same file; 0: off)")
    block_tune_lr: float = Field(0.0, ge=0, description="block tuning: step of the rounding offsets, in grid steps (0: codes stay GPTQ's, "
                                 "only the scales train)")
    block_tune_scale_lr: float = Field(1e-3, ge=0, description="block tuning: relative step of the group scales")
    block_tune_target: float = Field(0.0, ge=0, le=1, description="block tuning matches the original layer's "
                                     "output on the quantised model's inputs, moved this fraction toward the "
                                     "dense model's output (needs dense_target > 0)")
    true_sequential: bool = Field(True, description="quantise attention projections before the MLP "
                                                    "within each layer, each seeing the quantised inputs")


@register_quantizer("gptq", GPTQConfig)
def run_gptq(model: nn.Module, cfg: GPTQConfig, plan: dict[str, QuantScheme], calib: Any) -> dict[str, Any]:
    """Calibrate layer by layer with GPTQ; weights are rewritten in place (fake-quant)."""
    from qingzhou.compress.calibrate import LayerwiseOptions, run_layerwise
    from qingzhou.compress.quantize.block_tune import BlockTuneSettings
    from qingzhou.compress.quantize.gptq_solver import GPTQCollector

    collector = GPTQCollector(plan, block_size=cfg.block_size, damp_percent=cfg.damp_percent,
                              act_order=cfg.act_order, static_groups=cfg.static_groups,
                              hessian_clip=cfg.hessian_clip, dense_target=cfg.dense_target,
                              refit_max_bits=cfg.refit_max_bits,
                              block_tune=BlockTuneSettings(cfg.block_tune_steps, cfg.block_tune_lr,
                                                           cfg.block_tune_scale_lr),
                              block_tune_target=cfg.block_tune_target)
    report = run_layerwise(model, calib, collector, LayerwiseOptions.from_config(cfg, targets=plan.__contains__))
    return {"modules": collector.results, "calibration": report.to_dict()}
