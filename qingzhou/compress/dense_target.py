"""Dense targets for layer-by-layer solvers: fit each linear to the *original model's* outputs.

The calibration engine feeds each linear the inputs X~ it gets in the partly compressed model, and
GPTQ minimises ||X~ W^T - X~ Q^T||: each layer copies its own weights faithfully onto inputs that
earlier layers have already bent, so rounding error accumulates down the stack. What the model
should produce is the original output X W^T, where X is the input the *dense* model gives that
linear. The least-squares fit of that target,

    min_Q ||X W^T - X~ Q^T||^2   =   min_Q ||X~ (W_t - Q)^T||^2 + const,
    W_t = W + W D H^-1,   D = 2/n (X - X~)^T X~,   H = 2/n X~^T X~,

is GPTQ of the corrected weight W_t on the same Hessian H (the asymmetric calibration of
GPTQv2/GPTAQ, Li et al. 2025, as a target correction before the unchanged column loop). On the
first layer X = X~ and W_t = W.

The full correction overfits: D and H come from the same calibration tokens, and W D H^-1 is
largest along H's weakest directions, so on SmolLM2 at 3 bits g64 the full step made held-out
perplexity worse (10 windows: 32.68 against 31.51 without). A fraction `alpha` of it helps: 0.25
gave 29.44 (GPTAQ's own code scales its asymmetric term by 0.25), 0.5 gave 29.22, the default of
`GPTQConfig.dense_target`.

`DenseStream` keeps the dense model's hidden states beside the engine's: in `begin_layer` (weights
still original) it runs the layer on them, recording each target linear's dense input per batch
and the dense layer output for the next layer; `add_batch` pairs each batch of X~ with its X and
accumulates D (once per shared input, like `HessianStore`); `correct` returns W_t. Linears whose
dense and compressed inputs do not pair up token for token (an MoE expert reached by different
tokens in the two streams) keep their plain target.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qingzhou.compress.calibrate import LayerBatch, _first_input, _layer_output
from qingzhou.compress.hessian import damped_inverse_cholesky, solver_hessian


class DenseStream:
    """The dense model's activations, one decoder layer ahead of the compressed ones."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] | None = None  # dense hidden states entering the current layer
        self.next_hidden: list[torch.Tensor] = []
        # keyed by the linear module itself (the engine's hooks get modules; names need the prefix)
        self.inputs: dict[nn.Module, list[torch.Tensor | None]] = {}  # per batch dense input [tokens, in]
        self.seen: dict[nn.Module, int] = {}
        self.cross: dict[nn.Module, _Cross] = {}
        self._last: tuple[torch.Tensor, torch.Tensor, _Cross] | None = None

    @torch.no_grad()
    def begin_layer(self, layer: nn.Module, inputs: list[LayerBatch], targets: list[nn.Module]) -> None:
        """Run `layer` (original weights) on the dense hidden states, recording the inputs of
        `targets` (its linears the solver will rewrite); the first layer seen starts from the
        engine's own inputs, which are the dense ones there."""
        if self.hidden is None:
            self.hidden = [b.hidden for b in inputs]
        self.inputs = {m: [] for m in targets}
        self.seen = dict.fromkeys(targets, 0)
        self.cross, self._last = {}, None
        raw: dict[str, Any] = {"x": None, "flat": None}

        def grab(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_input(args, kwargs)
            if x is not raw["x"]:  # linears reading one tensor keep one copy
                raw["x"], raw["flat"] = x, x.detach().reshape(-1, x.shape[-1]).clone()
            self.inputs[mod].append(raw["flat"])

        handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in targets]
        device = next(layer.parameters()).device
        self.next_hidden = []
        try:
            for h, batch in zip(self.hidden, inputs):
                out = _layer_output(layer(h.to(device), **batch.to(device).kwargs))
                self.next_hidden.append(out.to(h.device))
                raw["x"] = raw["flat"] = None
        finally:
            for handle in handles:
                handle.remove()

    def end_layer(self) -> None:
        self.hidden, self.next_hidden = self.next_hidden, []
        self.inputs, self.cross, self._last = {}, {}, None

    def add(self, module: nn.Module, x: torch.Tensor) -> None:
        """Pair batch `x` (the compressed model's input of `module`) with the dense one."""
        batches = self.inputs.get(module)
        if batches is None:
            return
        j = self.seen[module]
        self.seen[module] = j + 1
        dense = batches[j] if j < len(batches) else None
        if j < len(batches):
            batches[j] = None  # each batch is read once per linear
        last = self._last
        if last is not None and last[0] is x and dense is not None and last[1] is dense:
            self.cross[module] = last[2]  # a linear sharing this input: D is already accumulated
            return
        acc = self.cross.setdefault(module, _Cross())
        if dense is None or dense.shape != x.reshape(-1, x.shape[-1]).shape:
            acc.paired = False
            return
        acc.add(dense.to(x.device), x)
        self._last = (x, dense, acc)

    @torch.no_grad()
    def correct(self, module: nn.Module, H: torch.Tensor, n_tokens: int, damp_percent: float,
                alpha: float = 1.0, name: str = "") -> torch.Tensor | None:
        """W + alpha * W D H^-1 for `module` (float32, on its weight's device), or None when it has
        no paired dense inputs. `H` is its Hessian on the same `n_tokens`, damped as the solver
        damps it; alpha = 1 is the full least-squares target (see the module doc for why less)."""
        acc = self.cross.pop(module, None)
        if acc is None or not acc.paired or acc.n != n_tokens or acc.n == 0:
            return None
        W = module.weight.detach().float()
        WD = W @ (acc.D.to(W.device) * (2.0 / acc.n))
        del acc  # D ([in, in], popped above) goes before the inverse's matrices exist: lower peak memory
        # H^-1 = U^T U with GPTQ's damping and its retries on a Hessian that is not positive definite;
        # H itself, not a copy (its diagonal is damped and restored in place)
        U = damped_inverse_cholesky(solver_hessian(H, W.device, copy=False), damp_percent, name=name).chol_inv_upper
        return W + alpha * ((WD @ U.T) @ U)


class _Cross:
    """Running sum of (X - X~)^T X~ over paired batches (float32)."""

    def __init__(self) -> None:
        self.D: torch.Tensor | None = None
        self.n = 0
        self.paired = True

    def add(self, dense: torch.Tensor, x: torch.Tensor) -> None:
        xf = x.reshape(-1, x.shape[-1]).float()
        delta = dense.reshape(xf.shape).float() - xf
        if self.D is None:
            self.D = torch.zeros(xf.shape[1], xf.shape[1], dtype=torch.float32, device=xf.device)
        self.D.addmm_(delta.T, xf)
        self.n += xf.shape[0]
