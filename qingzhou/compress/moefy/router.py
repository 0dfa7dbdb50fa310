"""Routers: which experts a token should run.

* centroid (the paper's "similarity selection"): expert i's score is x . c_i with c_i the mean of
  its neurons' input weight vectors (gate rows for gated FFNs, where the gate decides whether a
  neuron fires; up rows otherwise). Data-free once the partition exists, and costs k dot products.
* trained (the paper's "MLP selection"): a small MLP fitted on calibration tokens to predict each
  expert's share of the FFN output norm, ||sum_{j in i} a_j W_down[:, j]||, trained with a soft
  cross-entropy so that only the ranking matters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qingzhou.llm.moe import MLPLayout, make_router


def expert_norms(acts: torch.Tensor, down_weight: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """[tokens, k]: the norm of each expert's contribution to the FFN output, the quantity a
    router should rank by (dropping an expert adds exactly that vector to the error)."""
    w = down_weight.float().to(acts.device)
    cols = [(acts[:, a:b] @ w[:, a:b].T).norm(dim=1) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.stack(cols, dim=1)


def centroid_router(mlp: nn.Module, layout: MLPLayout, bounds: list[int]) -> nn.Module:
    """A bias-free linear whose row i is the mean input weight vector of expert i's neurons."""
    w = getattr(mlp, layout.gate or layout.up).weight.detach()
    rows = [w[a:b].float().mean(dim=0) for a, b in zip(bounds[:-1], bounds[1:])]
    router = make_router(w.shape[1], len(rows), bias=False).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        router.weight.copy_(torch.stack(rows))
    return router.requires_grad_(False)





def train_router(x: torch.Tensor, norms: torch.Tensor, *, width: int, steps: int, lr: float,
                 seed: int, batch: int = 512) -> nn.Module:
    """Fit a router on calibration inputs `x` [tokens, hidden] to the experts' output shares."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = make_router(x.shape[1], norms.shape[1], width).to(x.device)
    x = x.float()
    target = norms / norms.sum(dim=1, keepdim=True).clamp_min(1e-12)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(x.shape[0], (min(batch, x.shape[0]),), generator=gen).to(x.device)
            loss = -(target[idx] * F.log_softmax(router(x[idx]), dim=1)).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return router.requires_grad_(False).eval()


@torch.no_grad()
def routing_quality(scores: torch.Tensor, norms: torch.Tensor, top_k: int) -> dict[str, float]:
    """How well `scores` [tokens, k] pick the experts with the largest true contributions `norms`:
    recall of the true top-e, and the share of the output norm mass the picks keep vs the oracle's."""
    picked = torch.topk(scores.float(), top_k, dim=1).indices
    best = torch.topk(norms, top_k, dim=1).indices
    hits = (picked.unsqueeze(2) == best.unsqueeze(1)).any(dim=2).float().sum(dim=1) / top_k
    total = norms.sum(dim=1).clamp_min(1e-12)
    return {"recall": float(hits.mean()),
            "mass_kept": float((norms.gather(1, picked).sum(dim=1) / total).mean()),
            "oracle_mass_kept": float((norms.gather(1, best).sum(dim=1) / total).mean()),
            "chance_recall": top_k / norms.shape[1]}
