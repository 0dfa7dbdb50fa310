"""Measured per-linear loss of every (bits, group size) option, from one calibration pass.

`fit` needs, for each decoder linear and each option, how much that option hurts. The calibration
engine already forms each linear's input Hessian `H = 2/n X^T X` (`compress/hessian.py`), and the
output error of replacing W by Q(W) on the calibration inputs is exactly
`tr((W - Q) H (W - Q)^T)` = 2/n * ||X (W - Q)^T||^2: one small matmul per option, no forward pass
per option. Q is RTN on the option's group grid (`grid.rtn_quantize_weight`), the grid every method
exports; the GPTQ error per option can replace it later with the same collector.

The collector leaves every weight unchanged, so all errors are measured on the original model's
activations and do not depend on the order in which linears are visited. Linears no calibration
token reached (an MoE expert nobody was routed to) get the weight-space error (H = I) and are
flagged `unfed`, so the solver still sees a loss that grows as the option coarsens.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qingzhou.compress.fit.storage import Option, linear_bytes, option_space, options_for
from qingzhou.compress.hessian import HessianAccumulator, HessianCollector

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from qingzhou.compress.calibrate import LayerwiseOptions


@dataclass
class LinearSensitivity:
    """One linear's shape, storage and measured error per option (`errors[option]`, keep = 0)."""

    name: str
    in_features: int
    out_features: int
    bias_bytes: int
    dtype_bytes: int
    errors: dict[Option, float] = field(default_factory=dict)
    tokens: int = 0
    unfed: bool = False

    def cost(self, option: Option) -> int:
        """Bytes this linear takes in the GPTQ export under `option` (`storage.linear_bytes`)."""
        return linear_bytes(self.in_features, self.out_features, option, bias_bytes=self.bias_bytes,
                            dtype_bytes=self.dtype_bytes)

    def table(self) -> dict[Option, tuple[int, float]]:
        """{option: (bytes, error)}: this linear's row of the solver's table."""
        return {o: (self.cost(o), e) for o, e in self.errors.items()}


def output_error(weight: torch.Tensor, qweight: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the summed squared output error of Q on the inputs behind H."""
    E = (weight.float() - qweight.float()).to(H.device)
    return float(((E @ H) * E).sum())


class SensitivityCollector(HessianCollector):
    """Calibration-engine callback: for each planned linear, the output error of every option.

    `options(name, module)` lists the options of one linear (default: `options_for` its input
    width out of `options`). Results land in `sensitivities[name]`; weights are never written."""

    def __init__(self, options: Iterable[Option] | None = None, *, sym: bool = False, clip_search: bool = True,
                 options_of: Callable[[str, nn.Linear], Sequence[Option]] | None = None) -> None:
        super().__init__()
        self.options = list(options) if options is not None else option_space()
        self.sym, self.clip_search = sym, clip_search
        self.options_of = options_of or (lambda name, m: options_for(m.in_features, self.options))
        self.sensitivities: dict[str, LinearSensitivity] = {}

    def _measure(self, name: str, module: nn.Linear, H: torch.Tensor | None, tokens: int) -> dict[str, Any]:
        from qingzhou.llm.quantized.grid import QuantScheme, rtn_quantize_weight

        w = module.weight.detach().float()
        from qingzhou.compress.fit.storage import STORED_FLOAT

        bias = STORED_FLOAT if module.bias is not None else 0  # the file stores floats in 16 bits
        sens = LinearSensitivity(name, module.in_features, module.out_features, bias,
                                 STORED_FLOAT, tokens=tokens, unfed=H is None)
        for option in self.options_of(name, module):
            if option.keep:
                sens.errors[option] = 0.0
                continue
            scheme = QuantScheme(bits=int(option.bits), group_size=option.group_size,  # type: ignore[arg-type]
                                 sym=self.sym, clip_search=self.clip_search)
            q = rtn_quantize_weight(w, scheme).dequantize().to(w.device)
            if H is None:
                sens.errors[option] = float(((w - q) ** 2).sum())
            else:
                sens.errors[option] = output_error(w, q, H)
        self.sensitivities[name] = sens
        return {"errors": {o.label: e for o, e in sens.errors.items()}, "tokens": tokens, "unfed": sens.unfed}

    def solve(self, name: str, module: nn.Linear, acc: HessianAccumulator) -> dict[str, Any]:
        return self._measure(name, module, acc.H, acc.n)

    def fallback(self, name: str, module: nn.Linear) -> dict[str, Any]:
        return self._measure(name, module, None, 0)


def measure_sensitivity(model: nn.Module, samples: Sequence[torch.Tensor], options: Iterable[Option] | None = None,
                        *, layerwise: LayerwiseOptions | None = None, sym: bool = False,
                        clip_search: bool = True) -> dict[str, LinearSensitivity]:
    """Per-linear error of every option on `samples` (1-D token tensors), through the one
    calibration engine; `layerwise.targets` picks the linears (default: all decoder linears).
    The model's weights are left as they were."""
    from qingzhou.compress.calibrate import LayerwiseOptions, run_layerwise

    collector = SensitivityCollector(options, sym=sym, clip_search=clip_search)
    run_layerwise(model, samples, collector, layerwise or LayerwiseOptions())
    return collector.sensitivities
