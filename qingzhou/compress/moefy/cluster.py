"""Balanced spherical k-means: split n neurons into k groups of equal size (+-1).

Why balanced: an expert is a contiguous slice of the FFN, and "run e of k experts" only keeps e/k
of the compute if every expert has the same width. Why our own: the paper's code uses the
`k_means_constrained` package (min-cost flow, slow for 14k neurons x 64 clusters); a capacity-
constrained greedy assignment inside Lloyd iterations gives the same balanced partitions in a few
vectorised torch ops and needs no extra dependency.
"""
from __future__ import annotations

import torch


def balanced_sizes(n: int, k: int) -> list[int]:
    """Sizes of k groups covering n items: the first n % k groups get one more."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} neurons into {k} experts")
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _init_centroids(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on cosine distance (well-spread starting centroids, reproducible)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    dist = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        probs = dist if float(dist.sum()) > 0 else torch.ones_like(dist)
        idx = int(torch.multinomial(probs.cpu(), 1, generator=gen))
        centroids.append(x[idx])
        dist = torch.minimum(dist, (1 - x @ x[idx]).clamp_min(0))
    return torch.stack(centroids)


def balanced_assign(sim: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Assign each row of `sim` [n, k] to a column, column j receiving exactly sizes[j] rows.

    Rounds of proposals: every unassigned item proposes to its most similar column that still
    has room; each column accepts its most similar proposers up to its remaining room. Each round
    fills at least one column or places every proposer, so at most k rounds run.
    """
    n, k = sim.shape
    labels = torch.full((n,), -1, dtype=torch.long, device=sim.device)
    room = torch.tensor(sizes, device=sim.device)
    while True:
        free = (labels < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return labels
        s = sim[free].clone()
        s[:, room == 0] = float("-inf")
        score, best = s.max(dim=1)
        for j in best.unique().tolist():
            proposers = (best == j).nonzero().squeeze(1)
            take = min(int(room[j]), proposers.numel())
            chosen = proposers[torch.topk(score[proposers], take).indices]
            labels[free[chosen]] = j
            room[j] -= take


def balanced_kmeans(features: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Labels in [0, k) for each row of `features` [n, d], every label used n//k or n//k+1 times.

    Rows are compared by cosine similarity (spherical k-means), so a neuron's scale does not
    decide its group, only its direction (its weight vector or its activation pattern).
    """
    x = _normalize(features.float())
    sizes = balanced_sizes(x.shape[0], k)
    gen = torch.Generator().manual_seed(seed)
    centroids = _init_centroids(x, k, gen)
    labels = balanced_assign(x @ centroids.T, sizes)
    for _ in range(iters):
        sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, x)
        centroids = _normalize(sums)
        new = balanced_assign(x @ centroids.T, sizes)
        if torch.equal(new, labels):
            break
        labels = new
    return labels
