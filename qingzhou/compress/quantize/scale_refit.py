"""Refit GPTQ's group scales to its codes: the least-squares scales for the integer codes it chose.

GPTQ fixes every group's (scale, zero) before its column loop (static groups, from the original
weight and a clip search on each group alone), then chooses integer codes column by column, pushing
each rounding error onto later columns. Once the codes are chosen, the scales are no longer the
best ones for them: the output error on the calibration inputs,

    e(s) = (w - q(s)) H (w - q(s))^T,   q(s)_j = s_g(j) * (c_j - z_g(j))   (one output row),

is a quadratic in that row's group scales `s`, minimised by the normal equations `G s = b` with
`G[g, h] = a_g H a_h^T`, `b[g] = a_g H w^T` and `a_g` the row's `(c - z)` restricted to group g.
One [ng x ng] solve per output row (ng = 9 for a 576-wide layer at g64), after one
[rows x cols x cols] product: about the cost of one output-error evaluation, small next to the
column loop. The codes and zero points (integers in the file) stay; only the fp16 scales change,
so the checkpoint format, its loaders and its kernels are untouched.

A row keeps its old scales unless the refit lowers its error after the fp16 rounding and every
new scale is finite and positive (a group whose codes all sit on the zero point has no say in its
scale: the ridge keeps it at its old value).
"""
from __future__ import annotations

import torch

from qingzhou.llm.quantized.grid import _MIN_SCALE

RIDGE = 1e-6  # Tikhonov weight toward the old scales, relative to the mean diagonal of G


@torch.no_grad()
def refit_scales(target: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Least-squares group scales for fixed `codes`: ([groups, out] float32 scales, rows changed).

    `target` [out, in]: the weight GPTQ aimed at (its dense target when it had one); `codes`
    [out, in] and `scales`, `zeros` [groups, out] as the solver made them (float tensors); `g_idx`
    [in] the group of each column; `H` [in, in] the Hessian GPTQ used (same column order)."""
    W = target.float()
    rows, cols = W.shape
    n_groups = scales.shape[0]
    g = g_idx.long().to(W.device)
    A = codes.float() - zeros.float()[g].T  # [out, in]: q = A * s[g]
    Hf = H.float()
    M = torch.zeros(cols, n_groups, device=W.device)
    M[torch.arange(cols, device=W.device), g] = 1.0
    G = torch.empty(rows, n_groups, n_groups, device=W.device)
    for h in range(n_groups):
        idx = (g == h).nonzero().squeeze(1)
        if idx.numel() == 0:
            G[:, :, h] = 0
            continue
        T = A[:, idx] @ Hf[idx, :]  # [out, in]: sum over k in h of A_ik H_kj
        G[:, :, h] = (A * T) @ M
    b = (A * (W @ Hf)) @ M  # [out, groups]
    s_old = scales.float().T.contiguous()  # [out, groups]
    diag = G.diagonal(dim1=1, dim2=2)
    lam = RIDGE * diag.mean(1, keepdim=True).clamp_min(1e-30)  # [out, 1]
    eye = torch.eye(n_groups, device=W.device)
    s_new = torch.linalg.solve(G + lam.unsqueeze(2) * eye, (b + lam * s_old).unsqueeze(2)).squeeze(2)
    s_new = s_new.clamp(_MIN_SCALE, 65000.0).half().float()  # as stored: the nearest fp16 value

    def err(s: torch.Tensor) -> torch.Tensor:  # e(s) - w H w^T per row
        return torch.einsum("rg,rgh,rh->r", s, G, s) - 2 * (b * s).sum(1)

    ok = torch.isfinite(s_new).all(1) & (s_new > 0).all(1)
    better = ok & (err(torch.where(ok.unsqueeze(1), s_new, s_old)) < err(s_old))
    out = torch.where(better.unsqueeze(1), s_new, s_old)
    return out.T.contiguous(), int(better.sum())
