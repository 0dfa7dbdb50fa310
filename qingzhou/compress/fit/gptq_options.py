"""GPTQ's own output error for every (bits, group size) option of one linear, in one column loop.

`fit` must rank options by the error the quantizer that applies the plan will actually leave, and
GPTQ's error differs from RTN's by a different amount at every width (GPTQ recovers most at 3 bits,
little at 8). Running `gptq_quantize_weight` once per option would cost SmolLM2 12 solver runs per
linear (~25 CPU-minutes). This runs them together, with exactly the solver's arithmetic for its
default static groups (`GPTQConfig.static_groups`):

* the Hessian's damped inverse Cholesky factor and the act-order permutation depend only on H, so
  they are computed once per linear, not once per option;
* GPTQ's rows are independent given that factor (each output row pushes its own rounding error
  onto its own later columns), so the K options are K stacked copies of W, each row with its
  option's per-column scale, zero and `maxq`, walked by one column loop: the loop's Python
  overhead is paid once and its vector ops are K times longer.

Per option the group grids come from `grid.find_params` on the original weight, weighed by the
Hessian diagonal when `hessian_clip` (as the solver does), and the result is the solver's
`QuantizedWeight`; `tests/test_fit.py` checks both against `gptq_quantize_weight` option by option.
The error reported is `tr((W - Q) H (W - Q)^T)` on the undamped H, the same measure as RTN's in
`sensitivity.py`, so the two are comparable. It comes from the loop itself: GPTQ's per-column
losses `((w - q) / U_jj)^2` sum exactly to that quadratic form for the matrix it factorised
(H + damping, dead diagonal set to 1), so subtracting the damping's share leaves the undamped error
without a [rows x cols x cols] matmul per option.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qingzhou.compress.fit.fisher import weighted_total
from qingzhou.compress.fit.storage import Option
from qingzhou.compress.hessian import damped_inverse_cholesky, solver_hessian
from qingzhou.llm.quantized.grid import QuantizedWeight, QuantScheme, find_params


@dataclass
class OptionResult:
    """One option's GPTQ result: its output error and (if asked) its quantised weight."""

    error: float
    quantized: QuantizedWeight | None = None


@torch.no_grad()
def gptq_option_errors(
    weight: torch.Tensor, H: torch.Tensor, options: Sequence[Option], *, sym: bool = False,
    clip_search: bool = True, block_size: int = 128, damp_percent: float = 0.01, act_order: bool = True,
    hessian_clip: bool = True, clip_grid: int = 100, keep_weights: bool = False, name: str = "",
    max_elements: int = 1 << 26, row_weights: torch.Tensor | None = None,
) -> dict[Option, OptionResult]:
    """GPTQ (static groups) of `weight` [out, in] under every non-keep option, in one pass.

    `H`: the linear's proxy Hessian (`HessianAccumulator.H`). Returns {option: OptionResult};
    `keep_weights` keeps each option's `QuantizedWeight` (codes uint8, the export's grid).
    `max_elements`: at most this many stacked weights per column loop (options are chunked).
    `row_weights` [out]: the error is `sum_r row_weights[r] * error of row r` (`fisher.output_fisher`)."""
    opts = [o for o in options if not o.keep]
    if not opts:
        return {}
    W0 = weight.detach().float()
    rows, cols = W0.shape
    Hs = solver_hessian(H, W0.device)
    hdiag = torch.diag(Hs).clone() if hessian_clip else None
    schemes = [QuantScheme(bits=int(o.bits), group_size=o.group_size, sym=sym, clip_search=clip_search)  # type: ignore[arg-type]
               for o in opts]
    # per option: static group parameters from the original weight (the solver's `static_groups`)
    grids: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for s in schemes:
        gs, n_groups = s.effective_group_size(cols), s.groups(cols)
        scales = torch.zeros(n_groups, rows, device=W0.device)
        zeros = torch.zeros(n_groups, rows, device=W0.device)
        for g in range(n_groups):
            cut = slice(g * gs, (g + 1) * gs)
            scales[g], zeros[g] = find_params(W0[:, cut], s.bits, s.sym, s.clip_search, grid=clip_grid,
                                              col_weight=None if hdiag is None else hdiag[cut])
        g_idx = torch.arange(cols, dtype=torch.int32) // gs
        grids.append((scales, zeros, g_idx))
    perm = torch.argsort(torch.diag(Hs), descending=True) if act_order else torch.arange(cols, device=W0.device)
    Hp = Hs[perm][:, perm]
    inv = damped_inverse_cholesky(Hp, damp_percent, name=name)
    Hinv = inv.chol_inv_upper
    mean_diag = float(torch.diag(Hp).mean())
    damp = inv.damp_percent * (mean_diag if mean_diag > 0 else 1.0)  # what the factorisation added to diag H
    dead = torch.diag(H.detach().float().to(W0.device)) == 0  # solver_hessian set these to 1
    del Hp
    # options in chunks of at most `max_elements` stacked weights (a 7B down_proj x 12 options would
    # hold ~11 GB per temporary); each chunk reuses the one factorisation
    per = max(1, max_elements // max(rows * cols, 1))
    out: dict[Option, OptionResult] = {}
    for c0 in range(0, len(opts), per):
        chunk = list(range(c0, min(c0 + per, len(opts))))
        codes, loss = _column_loop(W0, perm, Hinv, [grids[k] for k in chunk], [schemes[k] for k in chunk],
                                   block_size)
        for j, k in enumerate(chunk):
            scales, zeros, g_idx = grids[k]
            g = g_idx.long().to(W0.device)
            c = codes[j * rows:(j + 1) * rows]
            Q = (c - zeros[g].T) * scales[g].T  # the loaders' arithmetic, as the solver returns it
            if not torch.isfinite(Q).all():
                raise FloatingPointError(f"{name}: GPTQ produced non-finite weights for {opts[k].label}")
            E2 = (W0 - Q).square_()
            # GPTQ's column losses sum to tr(E H' E^T) for the H' it factorised (H + damp*I, dead
            # diagonal set to 1): the undamped error without an extra [rows x cols x cols] matmul
            row_err = loss[j * rows:(j + 1) * rows] - damp * E2.sum(1) - E2[:, dead].sum(1)
            error = weighted_total(row_err, row_weights)
            qw = None
            if keep_weights:
                qw = QuantizedWeight(codes=c.to(torch.uint8).cpu(), scales=scales.half().cpu(),
                                     zeros=zeros.to(torch.int32).cpu(), g_idx=g_idx, scheme=schemes[k])
            out[opts[k]] = OptionResult(max(error, 0.0), qw)
    return out


def _column_loop(W0: torch.Tensor, perm: torch.Tensor, Hinv: torch.Tensor,
                 grids: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], schemes: list[QuantScheme],
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop (`gptq_solver.gptq_quantize_weight`, static groups) over K stacked copies
    of `W0`, copy k on option k's grid: codes [K*rows, cols] in the original column order, and each
    row's summed squared scaled error (the solver's `losses` * 2).

    The weights are held transposed ([cols, K*rows]) so that each column, and the rows of the lazy
    rank-1 update, are contiguous: the same per-element arithmetic as the solver, ~2x faster."""
    rows, cols = W0.shape
    K = len(schemes)
    WT = W0[:, perm].T.repeat(1, K).contiguous()  # [cols, K*rows], option k in k*rows:(k+1)*rows
    gl = [g.long().to(W0.device)[perm] for _, _, g in grids]
    ST = torch.cat([sc[g] for (sc, _, _), g in zip(grids, gl)], dim=1)  # per-element scale, permuted columns
    ZT = torch.cat([ze[g] for (_, ze, _), g in zip(grids, gl)], dim=1)
    maxq = torch.cat([torch.full((rows,), float(s.maxq), device=W0.device) for s in schemes])
    codes = torch.zeros_like(WT)
    loss = torch.zeros(WT.shape[1], device=W0.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = WT[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            w, s, z = W1[i], ST[col], ZT[col]
            q = torch.minimum(torch.clamp(torch.round(w / s) + z, min=0), maxq)
            codes[col] = q
            err = Err1[i]
            torch.sub(w, (q - z).mul_(s), out=err)
            err.div_(Hinv1[i, i])
            W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1)
        loss += Err1.square().sum(0)
        WT[i2:] -= Hinv[i1:i2, i2:].T @ Err1
    return codes[torch.argsort(perm)].T, loss
