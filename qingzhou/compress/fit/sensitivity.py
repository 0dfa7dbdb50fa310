"""Measured per-linear loss of every (bits, group size) option, from one calibration pass.

`fit` needs, for each decoder linear and each option, how much that option hurts. The calibration
engine already forms each linear's input Hessian `H = 2/n X^T X` (`compress/hessian.py`), and the
output error of replacing W by Q on the calibration inputs is exactly
`tr((W - Q) H (W - Q)^T)` = 2/n * ||X (W - Q)^T||^2: one small matmul per option, no forward pass
per option. Q is what the quantizer that will apply the plan leaves: for `gptq`, GPTQ's own result
for that option (`gptq_options.gptq_option_errors`, all options of a linear in one column loop),
for `rtn`, round-to-nearest on the option's grid.

Which inputs: the original model's. The collector never writes a weight, so every linear's errors
are measured on the activations of the unquantised earlier layers. That is a choice, made because
the allocation is a knapsack: it needs each linear's loss per option to be a fixed number, not a
function of what earlier linears chose. Measured behind already-quantised earlier layers, the
numbers would depend on one particular upstream plan (which one? the plan is what we are solving
for), and the sum over linears would no longer be the loss of the plan. The GPTQ run that applies
the plan is sequential (each linear sees its quantised predecessors and compensates for them), so
the measurement is a slight overestimate of what applying leaves, alike for every option; the
end-to-end KL check in `fit` measures the plan as applied.

Linears no calibration token reached (an MoE expert nobody was routed to) get the weight-space
RTN error (H = I) and are flagged `unfed`, so the solver still sees a loss that grows as the
option coarsens.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qingzhou.compress.fit.fisher import weighted_total
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


def output_error(weight: torch.Tensor, qweight: torch.Tensor, H: torch.Tensor,
                 row_weights: torch.Tensor | None = None) -> float:
    """tr((W - Q) H (W - Q)^T): the summed squared output error of Q on the inputs behind H (each
    output row's share times `row_weights[row]` when given)."""
    E = (weight.float() - qweight.float()).to(H.device)
    return weighted_total(((E @ H) * E).sum(1), row_weights)


class SensitivityCollector(HessianCollector):
    """Calibration-engine callback: for each planned linear, the output error of every option.

    `options(name, module)` lists the options of one linear (default: `options_for` its input
    width out of `options`). Results land in `sensitivities[name]`; weights are never written.
    `gptq`: None measures RTN; a dict of GPTQ settings (`block_size`, `damp_percent`, `act_order`,
    `hessian_clip`, `clip_grid`) measures GPTQ's error. `keep_weights` keeps each GPTQ option's
    `QuantizedWeight` in `weights[name][option]` (to assemble candidate plans without re-solving).
    `row_weights[name]` [out]: weigh each output row's error (`fisher.output_fisher`, loss units)."""

    def __init__(self, options: Iterable[Option] | None = None, *, sym: bool = False, clip_search: bool = True,
                 options_of: Callable[[str, nn.Linear], Sequence[Option]] | None = None,
                 gptq: dict[str, Any] | None = None, keep_weights: bool = False,
                 row_weights: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.row_weights = row_weights or {}
        self.options = list(options) if options is not None else option_space()
        self.sym, self.clip_search = sym, clip_search
        self.options_of = options_of or (lambda name, m: options_for(m.in_features, self.options))
        self.gptq, self.keep_weights = gptq, keep_weights
        self.sensitivities: dict[str, LinearSensitivity] = {}
        self.weights: dict[str, dict[Option, Any]] = {}

    def _measure(self, name: str, module: nn.Linear, H: torch.Tensor | None, tokens: int) -> dict[str, Any]:
        from qingzhou.llm.quantized.grid import QuantScheme, rtn_quantize_weight

        w = module.weight.detach().float()
        from qingzhou.compress.fit.storage import STORED_FLOAT

        bias = STORED_FLOAT if module.bias is not None else 0  # the file stores floats in 16 bits
        sens = LinearSensitivity(name, module.in_features, module.out_features, bias,
                                 STORED_FLOAT, tokens=tokens, unfed=H is None)
        options = list(self.options_of(name, module))
        if self.gptq is not None and H is not None:
            from qingzhou.compress.fit.gptq_options import gptq_option_errors

            res = gptq_option_errors(w, H, options, sym=self.sym, clip_search=self.clip_search,
                                     keep_weights=self.keep_weights, name=name,
                                     row_weights=self.row_weights.get(name), **self.gptq)
            sens.errors = {o: 0.0 if o.keep else res[o].error for o in options}
            if self.keep_weights:
                self.weights[name] = {o: r.quantized for o, r in res.items()}
            self.sensitivities[name] = sens
            return {"errors": {o.label: e for o, e in sens.errors.items()}, "tokens": tokens, "unfed": False}
        for option in options:
            if option.keep:
                sens.errors[option] = 0.0
                continue
            scheme = QuantScheme(bits=int(option.bits), group_size=option.group_size,  # type: ignore[arg-type]
                                 sym=self.sym, clip_search=self.clip_search)
            qw = rtn_quantize_weight(w, scheme)
            if self.keep_weights:
                self.weights.setdefault(name, {})[option] = qw
            q = qw.dequantize().to(w.device)
            rw = self.row_weights.get(name)
            if H is None:
                sens.errors[option] = weighted_total(((w - q) ** 2).sum(1), rw)
            else:
                sens.errors[option] = output_error(w, q, H, rw)
        self.sensitivities[name] = sens
        return {"errors": {o.label: e for o, e in sens.errors.items()}, "tokens": tokens, "unfed": sens.unfed}

    def solve(self, name: str, module: nn.Linear, acc: HessianAccumulator) -> dict[str, Any]:
        return self._measure(name, module, acc.H, acc.n)

    def fallback(self, name: str, module: nn.Linear) -> dict[str, Any]:
        return self._measure(name, module, None, 0)


def measure_sensitivity(model: nn.Module, samples: Sequence[torch.Tensor], options: Iterable[Option] | None = None,
                        *, layerwise: LayerwiseOptions | None = None, sym: bool = False,
                        clip_search: bool = True, gptq: dict[str, Any] | None = None,
                        collector: SensitivityCollector | None = None) -> dict[str, LinearSensitivity]:
    """Per-linear error of every option on `samples` (1-D token tensors), through the one
    calibration engine; `layerwise.targets` picks the linears (default: all decoder linears).
    `gptq`: GPTQ settings to measure GPTQ's error (None: RTN's). A given `collector` is used
    as is (its `weights` then hold what it kept). The model's weights are left as they were."""
    from qingzhou.compress.calibrate import LayerwiseOptions, run_layerwise

    collector = collector or SensitivityCollector(options, sym=sym, clip_search=clip_search, gptq=gptq)
    run_layerwise(model, samples, collector, layerwise or LayerwiseOptions())
    return collector.sensitivities
