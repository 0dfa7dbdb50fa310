"""Hessian statistics of a linear's inputs, shared by every Hessian-based method.

GPTQ, SparseGPT and AWQ (its clip search and its GPTQ solver) all judge a rewritten weight by the
error it causes on the layer's *outputs*, `(W - Q) H (W - Q)^T` with the proxy Hessian
`H = 2/n X^T X` of the linear's calibration inputs. This module holds that statistic
(`HessianAccumulator`), the per-linear bookkeeping that computes it once for linears reading one
input (`HessianStore`), the damped inverse Cholesky factor the column solvers need
(`damped_inverse_cholesky`), and the calibration-engine callback base that ties them together
(`HessianCollector`): a method supplies only how to solve one linear and what to do for a linear
no token reached. Torch is imported inside the functions, so method files (whose configs validate
before torch loads) can subclass `HessianCollector` at import.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over all calibration tokens (GPTQ/SparseGPT's proxy Hessian),
    kept in float32 whatever the model dtype, averaged so it does not grow with sample count.

    Wide inputs accumulate only the block upper triangle (about 60% of the multiply-adds for
    down_proj's 1536 or 14336 columns) and mirror it when `H` is read: the Hessian products are
    a large part of GPTQ's calibration time.
    """

    BLOCK = 256  # column block of the triangular update; narrower inputs use one full product

    def __init__(self, columns: int, device: torch.device | str):
        import torch

        self._H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self._mirrored = True
        self.n = 0

    @property
    def H(self) -> torch.Tensor:
        if not self._mirrored:
            cols, b = self._H.shape[0], self.BLOCK
            for a0 in range(0, cols, b):
                a1 = min(a0 + b, cols)
                self._H[a1:, a0:a1] = self._H[a0:a1, a1:].T
            self._mirrored = True
        return self._H

    def release(self) -> torch.Tensor:
        """H, handed over: the accumulator forgets it, so a solver holding the only reference can
        free it as soon as it has its working copy (one [n, n] float32 fewer at the peak)."""
        H = self.H
        self._H = None
        return H

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        self._H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * math.sqrt(2 / self.n)
        cols, b = x.shape[1], self.BLOCK
        if cols < 2 * b:
            self._H.addmm_(x.T, x)
            return
        for a0 in range(0, cols, b):  # rows a0:a1 of the upper triangle, diagonal block included
            a1 = min(a0 + b, cols)
            self._H[a0:a1, a0:].addmm_(x[:, a0:a1].T, x[:, a0:])
        self._mirrored = False


@dataclass
class SharedInput:
    """The tensor most recently added to a `HessianStore` and the accumulator that now holds it."""

    x: torch.Tensor
    acc: HessianAccumulator


class HessianStore:
    """One `HessianAccumulator` per linear (keyed by full module name).

    Linears fed the very same tensor object (q/k/v, gate/up: the calibration engine hands them one
    flattened input) share one accumulator, so X^T X is computed once per input rather than once
    per linear. Consumers only read `acc.H` (the solvers clone it), so sharing is safe.
    """

    def __init__(self) -> None:
        self.accumulators: dict[str, HessianAccumulator] = {}
        self.last: SharedInput | None = None

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add one batch `x` [tokens, in_features] of `name`'s inputs."""
        acc = self.accumulators.get(name)
        last = self.last
        if last is not None and last.x is x and (acc is None or acc is last.acc):
            self.accumulators[name] = last.acc  # already holds this batch
            return
        if acc is None:
            acc = self.accumulators[name] = HessianAccumulator(x.shape[-1], x.device)
        acc.add(x)
        self.last = SharedInput(x, acc)

    def pop(self, name: str) -> HessianAccumulator | None:
        return self.accumulators.pop(name, None)

    def __getitem__(self, name: str) -> HessianAccumulator:
        return self.accumulators[name]

    def __contains__(self, name: object) -> bool:
        return name in self.accumulators


class HessianCollector:
    """Calibration-engine callback base (`calibrate.LayerwiseCallback`) for methods that rewrite
    each linear from its inputs' Hessian: GPTQ, SparseGPT, AWQ.

    `add_batch` accumulates the Hessians; `finish_group` hands each linear of the group to
    `solve(name, module, acc)`, or to `fallback(name, module)` when no calibration token reached it
    (e.g. an MoE expert no token was routed to), and stores what they return in `results[name]`.
    Subclasses rewrite `module.weight` in place there and may override `prepare` to transform the
    inputs first (AWQ subsamples tokens).
    """

    def __init__(self) -> None:
        self.hessians = HessianStore()
        self.results: dict[str, dict[str, Any]] = {}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def add_batch(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        self.hessians.add(name, self.prepare(x))

    def finish_group(self, index: int, layer: nn.Module, modules: dict[str, nn.Linear]) -> None:
        import torch

        with torch.no_grad():
            for name, module in modules.items():
                acc = self.hessians.pop(name)
                if acc is None or acc.n == 0:
                    self.results[name] = self.fallback(name, module)
                else:
                    self.results[name] = self.solve(name, module, acc)

    def take_hessian(self, acc: HessianAccumulator) -> torch.Tensor:
        """`acc`'s H for a solver: handed over (`release`) when no other linear of the group still
        reads it, else the shared H itself. Solvers only read it, so pass it straight into the
        solver call, with no local name holding it: it is then freed once the solver has copied it."""
        if any(a is acc for a in self.hessians.accumulators.values()):
            return acc.H
        return acc.release()

    def solve(self, name: str, module: nn.Linear, acc: HessianAccumulator) -> dict[str, Any]:
        raise NotImplementedError

    def fallback(self, name: str, module: nn.Linear) -> dict[str, Any]:
        raise NotImplementedError


def solver_hessian(H: torch.Tensor, device: torch.device, *, copy: bool = True) -> torch.Tensor:
    """A float32 copy of `H` on `device` for a column solver, with the diagonal of dead input
    channels (never non-zero on calibration data) set to 1 so the matrix can be inverted; their
    weights then see no error pushed onto them and keep their values.

    `copy=False` returns `H` itself where it already is float32 on `device` with no dead channel
    (a copy otherwise): an [n, n] float32 is 256 MiB for an 8192-wide down_proj, and these copies
    set the peak memory of a streamed big model. The caller must then leave `H` as it found it
    (`damped_inverse_cholesky` restores the diagonal it damps)."""
    import torch

    H = H.detach()
    if not copy and H.dtype == torch.float32 and H.device == torch.device(device) and bool((torch.diag(H) != 0).all()):
        return H
    H = H.float().clone().to(device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    return H


@dataclass
class InverseHessian:
    """Upper Cholesky factor of H^-1 (what GPTQ/SparseGPT's column loop needs) and how it was damped."""

    chol_inv_upper: torch.Tensor
    damp_percent: float
    retries: int


def _all_finite(t: torch.Tensor, rows: int = 512) -> bool:
    """`torch.isfinite(t).all()` a block of rows at a time: on a whole [n, n] float32 matrix it
    allocates |t| and three boolean maps, ~2x the matrix, which was the peak of GPTQ's memory."""
    import torch

    return all(bool(torch.isfinite(t[i: i + rows]).all()) for i in range(0, t.shape[0], rows))


def damped_inverse_cholesky(H: torch.Tensor, damp_percent: float = 0.01, *, max_retries: int = 6,
                            name: str = "") -> InverseHessian:
    """Cholesky of (H + damp*mean(diag H)*I)^-1, multiplying the damping by 10 on failure.

    A Hessian that is not positive definite (too few tokens, duplicated or dead input channels,
    `damp_percent=0`) is retried with more damping and reported as a warning, never returned as NaN.
    """
    import torch

    mean_diag = torch.mean(torch.diag(H)).item()
    if not math.isfinite(mean_diag):
        raise FloatingPointError(f"{name}: Hessian contains NaN/inf (non-finite activations)")
    mean_diag = mean_diag if mean_diag > 0 else 1.0
    damp = damp_percent
    # Damp H's own diagonal and restore it exactly afterwards instead of damping a copy: each
    # [n, n] float32 is 256 MiB for an 8192-wide down_proj, and the copies were GPTQ's peak memory.
    diag = torch.diagonal(H).clone()
    try:
        for attempt in range(max_retries + 1):
            torch.diagonal(H).copy_(diag).add_(damp * mean_diag)
            L, info = torch.linalg.cholesky_ex(H)
            ok = int(info) == 0
            if ok:
                Hinv = torch.cholesky_inverse(L)
                del L
                U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
                del Hinv
                ok = int(info2) == 0 and _all_finite(U) and bool((torch.diag(U) > 0).all())
            else:
                del L
            if ok:
                if attempt:
                    warnings.warn(f"{name}: Hessian not positive definite with damp_percent="
                                  f"{damp_percent}; succeeded with damp_percent={damp:g} "
                                  f"after {attempt} retr{'y' if attempt == 1 else 'ies'}", stacklevel=2)
                return InverseHessian(U, damp, attempt)
            damp = damp * 10 if damp > 0 else 1e-4
    finally:
        torch.diagonal(H).copy_(diag)
    raise FloatingPointError(f"{name}: Hessian could not be inverted even with damp_percent={damp / 10:g}")
