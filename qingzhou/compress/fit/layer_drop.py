"""Dropping whole decoder layers as one more `fit` option (`drop_layers=N`: at most N).

A dropped layer costs nothing in the file: its linears and its norms are gone (the model is saved
with fewer layers by the structured pruning that exists, `prune/structured.py` `drop_layers`). What
it loses is measured, not guessed: the mean per-token KL of the final logits against the original
model when that one layer is skipped (its output replaced by its input, the residual stream passing
through), on a few of the calibration samples the other measurements use. That costs a forward per
layer and sample, so it is measured only for the layers that turn the residual stream least
(`angular_distances`, ShortGPT's ranking, one forward per sample): twice as many as may be dropped.

Units. The per-linear losses the solver adds up are Fisher-weighted output errors
(`fisher.py`): with `H = 2/n X^T X` a linear's error is `sum_c F_c * 2 * mean_t dy_tc^2`, and the
second-order loss increase per token is `1/2 sum_c F_c dy_tc^2`, so the summed proxy is 4x the mean
per-token loss increase, which for small changes is the KL to the original model. The drop loss is
therefore `4 * KL`, in the same units (on SmolLM2 the KL check's candidates measured
proxy / KL = 3.8-4.4). A dropped layer's KL is measured end to end, so it already includes how the
change compounds through the later layers; the linears' proxies do not, which makes the solver
lean slightly towards dropping, and the KL check of the candidate plans (one of them never drops)
decides between them. Needs `weighting="fisher"`: raw output errors are in no comparable unit.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qingzhou.compress.fit.storage import STORED_FLOAT

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

PROXY_PER_KL = 4.0  # see the module docstring


@dataclass
class LayerGroup:
    """One decoder layer as a droppable group: its index, name prefix, the fitted linears in it and
    the bytes of its other tensors (norms, linears left out of the search) in the file."""

    index: int
    prefix: str
    linears: tuple[str, ...]
    own_bytes: int


def layer_groups(model: nn.Module, linears: Sequence[str]) -> list[LayerGroup]:
    """The decoder layers holding at least one of `linears`, with what each writes besides them
    (16-bit floats, as `storage.model_bytes` counts them)."""
    from qingzhou.compress.calibrate import find_decoder_layers

    layers, prefix = find_decoder_layers(model)
    fitted = {f"{n}.{p}" for n in linears for p in ("weight", "bias")}
    out = []
    for i, layer in enumerate(layers):
        head = f"{prefix}.{i}"
        mine = tuple(n for n in linears if n.startswith(head + "."))
        if not mine:
            continue
        own = sum(t.numel() * (STORED_FLOAT if t.is_floating_point() else t.element_size())
                  for k, t in layer.state_dict().items() if f"{head}.{k}" not in fitted)
        out.append(LayerGroup(i, head, mine, own))
    return out


def _hidden_in(args: tuple, kwargs: dict) -> Any:
    """A decoder layer's input hidden states, passed positionally or by keyword."""
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> Any:
    """A decoder layer's output hidden states (a tensor, or the first of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def skipped(model: nn.Module, indices: Sequence[int]) -> Iterator[None]:
    """Within the block, the decoder layers `indices` pass their input through unchanged (the
    residual stream skips them), whatever their forward returns (a tensor or a tuple)."""
    from qingzhou.compress.calibrate import find_decoder_layers

    layers, _ = find_decoder_layers(model)

    def identity(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = _hidden_in(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def recorded(model: nn.Module, upto: int) -> Iterator[list[Any]]:
    """Within the block, every forward of `model` stores a copy of the output of each decoder layer
    below `upto` (a tensor, or a tuple as the layer returned it) in the yielded list, index =
    layer: what `replayed` plays back (0 records nothing)."""
    from qingzhou.compress.calibrate import find_decoder_layers

    layers, _ = find_decoder_layers(model)
    outputs: list[Any] = [None] * len(layers)

    def keep(i: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            # a copy: the next layer must not be able to change the record by an in-place op
            outputs[i] = (tuple(t.clone() if hasattr(t, "clone") else t for t in output)
                          if isinstance(output, tuple) else output.clone())
        return hook

    handles = [layers[i].register_forward_hook(keep(i)) for i in range(upto)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replayed(model: nn.Module, outputs: Sequence[Any], upto: int) -> Iterator[None]:
    """Within the block, decoder layers `0 .. upto-1` do no work: each returns its recorded output
    (`recorded`, from a model whose first `upto` layers are identical to these, on the same input).
    So a plan that changes nothing below layer `upto` is measured by running only the layers from
    `upto` on: `fit`'s per-layer KL calibration runs about half the layers per plan."""
    from qingzhou.compress.calibrate import find_decoder_layers

    layers, _ = find_decoder_layers(model)
    own = [layers[i].__dict__.get("forward") for i in range(upto)]  # e.g. accelerate's offload wrapper
    for i in range(upto):
        layers[i].forward = (lambda out: lambda *a, **k: out)(outputs[i])  # shadows the class's forward
    try:
        yield
    finally:
        for i, fwd in enumerate(own):
            if fwd is None:
                del layers[i].forward
            else:
                layers[i].forward = fwd


def angular_distances(model: nn.Module, samples: Sequence[torch.Tensor]) -> dict[int, float]:
    """{layer index: mean over tokens of arccos(cos(h_in, h_out)) / pi}: how far each decoder layer
    turns the residual stream (ShortGPT's block importance, as `structured_prune` ranks layers),
    from one forward per sample. Cheap, so `fit` uses it to pick which layers' drops to measure."""
    import torch
    import torch.nn.functional as F

    from qingzhou.compress.calibrate import find_decoder_layers

    layers, _ = find_decoder_layers(model)
    sums = [0.0] * len(layers)
    tokens = 0

    def hook(i: int):
        def on_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            h_in, h_out = _hidden_in(args, kwargs).float(), _hidden_out(output).float()
            cos = F.cosine_similarity(h_in.reshape(-1, h_in.shape[-1]), h_out.reshape(-1, h_out.shape[-1]), dim=-1)
            sums[i] += float(torch.arccos(cos.clamp(-1, 1)).sum()) / torch.pi
        return on_output

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for s in samples:
                model(input_ids=s.reshape(1, -1).to(device), use_cache=False)
                tokens += s.numel()
    finally:
        for h in handles:
            h.remove()
    return {i: v / max(tokens, 1) for i, v in enumerate(sums)}


def drop_losses(model: nn.Module, samples: Sequence[torch.Tensor], groups: Sequence[LayerGroup]) -> dict[int, float]:
    """{layer index: PROXY_PER_KL * mean per-token KL(original || layer skipped)} on `samples`
    (1-D token tensors): one forward of the original model and one per layer, per sample."""
    import torch

    from qingzhou.compress.fit.head_kl import heads_bypassed, kl_to, reference_side, shared_head
    from qingzhou.progress import progress_bar

    device = next(model.parameters()).device
    totals = {g.index: 0.0 for g in groups}
    tokens = 0
    was_training = model.training
    model.eval()
    head = shared_head(model, model)
    try:
        with torch.no_grad(), heads_bypassed([model], head), \
                progress_bar(len(samples) * len(groups), "fit: layer drops") as advance:
            for s in samples:
                ids = s.reshape(1, -1).to(device)
                ref = reference_side(model, ids, head)
                for g in groups:
                    with skipped(model, [g.index]):
                        totals[g.index] += kl_to(model, ids, ref, head)
                    advance()
                tokens += ids.numel()
    finally:
        model.train(was_training)
    return {i: PROXY_PER_KL * t / max(tokens, 1) for i, t in totals.items()}


def split_layer_name(name: str, prefix: str) -> tuple[int, str] | None:
    """(layer index, the rest of the name) of `{prefix}.{i}[.{rest}]`; None for a name outside the
    decoder layers under `prefix` (`model.layers`)."""
    if not name.startswith(prefix + "."):
        return None
    index, _, tail = name[len(prefix) + 1:].partition(".")
    return (int(index), tail) if index.isdigit() else None


def renamed(names: Sequence[str], prefix: str, dropped: Sequence[int]) -> dict[str, str]:
    """{name before the drop: name after it} for module names under `prefix` (`model.layers`):
    the kept layers are renumbered 0.. in order, as `structured_prune` leaves them."""
    gone = set(dropped)
    out = {}
    for name in names:
        split = split_layer_name(name, prefix)
        if split is None:
            out[name] = name
            continue
        i, tail = split
        if i in gone:
            raise ValueError(f"{name} is in a dropped layer")
        new = i - sum(1 for d in gone if d < i)
        out[name] = f"{prefix}.{new}.{tail}" if tail else f"{prefix}.{new}"
    return out
