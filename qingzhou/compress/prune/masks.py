"""Turning importance scores into pruning masks (True = weight is removed).

Every selector removes *exactly* the requested number of weights per comparison group (top-k on
the scores, not a threshold, so ties can never over- or under-prune):
* `row`   - each output row loses the same number of weights (Wanda's comparison group);
* `layer` - the whole matrix is one group (the classic magnitude / SparseGPT baseline);
* N:M     - every M consecutive input weights of a row keep exactly N (2:4, 4:8 ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    """What one linear should become: `nm=(n, m)` (semi-structured) or unstructured `sparsity`."""

    sparsity: float = 0.5
    nm: tuple[int, int] | None = None

    @property
    def fraction(self) -> float:
        """Fraction of weights removed."""
        return 1 - self.nm[0] / self.nm[1] if self.nm else self.sparsity

    def describe(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:.4g}"


def _lowest(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Boolean mask of the k lowest entries along `dim`."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(score, k, dim=dim, largest=False).indices
        mask.scatter_(dim, idx, True)
    return mask


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly the k lowest entries of the whole matrix."""
    return _lowest(score.reshape(-1), k, dim=0).view(score.shape)


def unstructured_mask(score: torch.Tensor, sparsity: float, *, per_row: bool) -> torch.Tensor:
    """Remove the `sparsity` fraction of lowest scores, per output row or over the whole matrix."""
    rows, cols = score.shape
    if per_row:
        return _lowest(score, int(cols * sparsity), dim=1)
    return lowest_k_mask(score, int(score.numel() * sparsity))


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest of every `m` consecutive scores in each row (columns must divide by m)."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs the input width ({cols}) divisible by M={m}")
    grouped = score.reshape(rows, cols // m, m)
    return _lowest(grouped, m - n, dim=2).view(rows, cols)


def select_mask(score: torch.Tensor, target: Target, *, per_row: bool) -> torch.Tensor:
    if target.nm is not None:
        return nm_mask(score, *target.nm)
    return unstructured_mask(score, target.sparsity, per_row=per_row)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of m consecutive weights in a row has at most n non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return bool((nonzero <= n).all())
