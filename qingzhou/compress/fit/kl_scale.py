"""Calibrating `fit`'s per-linear losses against measured end-to-end KL, one factor per linear.

Why: the proxy loss of a linear (its Fisher-weighted output error, `fisher.py`) is measured on the
original activations and weighs each output channel by a diagonal Fisher averaged over tokens. How
that proxy relates to what the model's output actually loses differs from layer to layer and from
one kind of linear to another. On Gemma 3 270M (sandwich norms around attention and MLP) the
measured held-out KL per unit of proxy, with one layer quantised at a time, ranged over 40x across
its 18 layers (0.0055 for layer 1 to 0.26 for layer 17) and 6x across its 7 kinds of linear
(down_proj 0.007, o_proj 0.05), while it stayed within ~1.5x between 2-bit and 4-bit options of
the same layer. The knapsack then spent bits where the proxy was inflated and starved the layers
near the output: its plans measured a higher KL than uniform 3- and 4-bit GPTQ.

What: the ratio is close to a product `a[layer] * b[kind]` that does not depend on the option, so
`len(layers) + len(kinds)` end-to-end measurements pin it down: the held-out KL with one layer's
linears at a reference option (3 bits, the group nearest 64) and all else original, and the KL
with one kind of linear at that option in every layer. `a` and `b` are fitted to those sums by
iterative proportional fitting (`fit_factors`), and each linear's proxy losses are multiplied by
`PROXY_PER_KL * a * b`, keeping the units `layer_drop.py` uses (4x the KL). On Gemma the spread
of log(KL / prediction) on plans not used for the fit fell from 0.83 to 0.24.

The quantised weights come from the sensitivity pass (`SensitivityCollector(keep_weights=True)`),
so each plan costs one forward per held-out sample, no GPTQ run.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qingzhou.compress.fit.layer_drop import PROXY_PER_KL, split_layer_name
from qingzhou.compress.fit.storage import Option

REFERENCE_BITS = 3
REFERENCE_GROUP = 64
KL_FLOOR = 1e-3  # a measured KL below this fraction of the median is read as this: noise, not "free"


def layer_and_kind(name: str, prefix: str) -> tuple[int, str] | None:
    """(decoder layer index, kind) of a linear named `{prefix}.{i}.{path}`; the kind is the path
    with any index replaced by `*` (an MoE expert's down_proj is one kind across experts)."""
    split = split_layer_name(name, prefix)
    if split is None:
        return None
    index, path = split
    return index, re.sub(r"\.\d+\.", ".*.", f".{path}.").strip(".")


def reference_option(options: Sequence[Option]) -> Option | None:
    """The option whose end-to-end damage is measured: 3 bits at the group size nearest 64, else
    the non-keep option nearest that (bits first)."""
    real = [o for o in options if not o.keep]
    if not real:
        return None
    return min(real, key=lambda o: (abs(int(o.bits) - REFERENCE_BITS), abs(o.group_size - REFERENCE_GROUP)))


def fit_factors(pred: Mapping[tuple[int, str], float], kl_layer: Mapping[int, float], kl_kind: Mapping[str, float],
                iters: int = 200) -> dict[tuple[int, str], float]:
    """{(layer, kind): a[layer] * b[kind]} with `sum_kind a b pred = kl_layer[layer]` and
    `sum_layer a b pred = kl_kind[kind]` as nearly as a product allows (iterative proportional
    fitting; exact when the product model holds). Cells of zero prediction get factor 1 x the median."""
    layers = sorted({k[0] for k in pred})
    kinds = sorted({k[1] for k in pred})
    a = dict.fromkeys(layers, 1.0)
    b = dict.fromkeys(kinds, 1.0)
    for _ in range(iters):
        for L in layers:
            s = sum(b[T] * pred[(L, T)] for T in kinds if (L, T) in pred)
            a[L] = kl_layer[L] / s if s > 0 else 0.0
        for T in kinds:
            s = sum(a[L] * pred[(L, T)] for L in layers if (L, T) in pred)
            b[T] = kl_kind[T] / s if s > 0 else 0.0
    out = {k: a[k[0]] * b[k[1]] for k in pred}
    positive = sorted(v for v in out.values() if v > 0)
    median = positive[len(positive) // 2] if positive else 1.0
    return {k: v if v > 0 else median for k, v in out.items()}


def kl_factors(sens: Mapping[str, Any], weights: Mapping[str, Mapping[Option, Any]],
               measure: Callable[[list[dict[str, Option]]], list[float]],
               prefix: str) -> tuple[dict[str, float], dict[str, Any]]:
    """({linear: factor on its proxy losses}, what was measured) from `len(layers) + len(kinds)`
    end-to-end measurements: `measure(plans)` returns each plan's mean held-out KL, a linear the
    plan does not name being original (`api.heldout_kl` on the measured `weights`). Linears
    outside the decoder layers under `prefix`, or without a measured reference option, keep factor 1."""
    where: dict[str, tuple[int, str]] = {}
    ref: dict[str, Option] = {}
    for name, s in sens.items():
        lk = layer_and_kind(name, prefix)
        o = reference_option(list(s.errors))
        if lk is not None and o is not None and name in weights and o in weights[name]:
            where[name], ref[name] = lk, o
    if not where:
        return {}, {}
    layers = sorted({v[0] for v in where.values()})
    kinds = sorted({v[1] for v in where.values()})
    plans = [{n: ref[n] for n, (L, _) in where.items() if L == layer} for layer in layers]
    plans += [{n: ref[n] for n, (_, T) in where.items() if T == kind} for kind in kinds]
    kls = measure(plans)
    floor = KL_FLOOR * sorted(kls)[len(kls) // 2]
    kls = [max(k, floor) for k in kls]
    kl_layer = dict(zip(layers, kls[:len(layers)]))
    kl_kind = dict(zip(kinds, kls[len(layers):]))
    pred: dict[tuple[int, str], float] = {}
    for n, cell in where.items():
        pred[cell] = pred.get(cell, 0.0) + float(sens[n].errors[ref[n]])
    cell_factor = fit_factors(pred, kl_layer, kl_kind)
    factors = {n: PROXY_PER_KL * cell_factor[cell] for n, cell in where.items()}
    info = {"reference": sorted({o.label for o in ref.values()}), "layer_kl": kl_layer, "kind_kl": kl_kind,
            "plans": len(plans)}
    return factors, info
