"""The one layer-by-layer calibration engine shared by GPTQ, AWQ, SmoothQuant, SparseGPT and Wanda.

Why layer by layer: a method only needs, for each linear layer, statistics of *its own inputs* as
they are after every earlier layer has already been compressed. So we run the embeddings once,
capture the inputs of decoder layer 0, and then walk the layers: move layer i to the device, feed
it the cached inputs, hand each linear's inputs to the method, let the method rewrite the weights,
recompute layer i's outputs with the rewritten weights, and use them as layer i+1's inputs. Only one
layer (plus its inputs) ever sits on the accelerator, so a model several times larger than device
memory calibrates, and errors of earlier layers are seen (and compensated) by later ones.

Callback API (duck-typed, so pruning methods reuse it without subclassing)::

    class MyMethod:
        def begin_layer(self, index, layer, inputs):   # optional; inputs: list[LayerBatch]
            ...                                         # (AWQ-style methods need the raw inputs)
        def add_batch(self, name, module, x):          # required
            ...   # x: the linear's input for one batch, shape [tokens, in_features], on device;
                  # accumulate a Hessian (`HessianAccumulator`), norms, ... keyed by `name`
        def finish_group(self, index, layer, names):   # required
            ...   # rewrite `module.weight` of every full module name in `names` in place
                  # (names that got no tokens are included; see `report.unfed`)
        def end_layer(self, index, layer):             # optional
            ...

`names` are full module names (`model.layers.3.self_attn.q_proj`), the same names
`model.named_modules()` gives, so methods can key per-module settings by them. With
`true_sequential=True` a layer's linears are processed in groups that share one input tensor,
in execution order (Llama: q/k/v, then o, then gate/up, then down), and each group sees inputs
produced by the already-compressed earlier groups; otherwise all linears of the layer are
collected in one pass and finished together.
"""
from __future__ import annotations

import math
import resource
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qingzhou.errors import DataError, ModelLoadError

# Attribute paths (from the CausalLM wrapper) where HF decoder models keep their layer list.
LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
               "model.decoder.layers")


class _StopForward(Exception):
    """Raised from a hook to abandon a forward pass once what we need has been recorded."""


@dataclass
class LayerBatch:
    """One batch of a decoder layer's inputs: hidden states [B, T, H] plus the keyword arguments
    the model passed to the layer (attention mask, position ids/embeddings ...)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]

    def to(self, device: torch.device | str) -> LayerBatch:
        return LayerBatch(self.hidden.to(device), _move(self.kwargs, device))

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


@dataclass
class LayerwiseReport:
    layers: int = 0
    samples: int = 0
    tokens: int = 0
    groups: list[list[str]] = field(default_factory=list)  # processing order of layer 0's linears
    unfed: list[str] = field(default_factory=list)  # linears that received no activations
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = ""
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def select_linears(model: nn.Module, skip: Sequence[str], overrides: Sequence[Any]) -> tuple[list[tuple[str, nn.Linear, Any]], list[str]]:
    """The decoder layers' linears a method should touch, for building its per-module plan.

    Returns `[(full name, module, first matching override or None)]` and the skipped names:
    those a `skip` regex matches or whose matching override says `skip`. Overrides are objects
    with a `pattern` regex (and whatever settings the method reads from them).
    """
    import re

    layers, prefix = find_decoder_layers(model)
    skip_res = [re.compile(p) for p in skip]
    rules = [(re.compile(o.pattern), o) for o in overrides]
    chosen: list[tuple[str, nn.Linear, Any]] = []
    skipped: list[str] = []
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            full = f"{prefix}.{i}.{name}"
            match = next((o for p, o in rules if p.search(full)), None)
            if any(p.search(full) for p in skip_res) or (match is not None and getattr(match, "skip", False)):
                skipped.append(full)
            else:
                chosen.append((full, module, match))
    return chosen, skipped


def find_decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layer list and its dotted path (e.g. `model.layers`), or a clear error."""
    for path in LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj, path
    arch = type(model).__name__
    raise ModelLoadError(
        f"cannot find the decoder layers of {arch}.",
        where="layer-wise calibration",
        hint=("Supported: Hugging Face decoder-only models that keep their layers at "
              + ", ".join(f"`{p}`" for p in LAYER_PATHS)
              + " (Llama, Qwen2/3, Mistral, Mixtral, Gemma, Phi-3, InternLM, Baichuan, Yi, DeepSeek, "
                "GPT-2/NeoX, OPT ...)."),
    )


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _move(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def batch_samples(samples: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack consecutive samples of equal length into [B, T] batches of at most `batch_size`."""
    batches: list[torch.Tensor] = []
    current: list[torch.Tensor] = []
    for s in samples:
        s = s.reshape(-1)
        if current and (len(current) == batch_size or current[0].shape[0] != s.shape[0]):
            batches.append(torch.stack(current))
            current = []
        current.append(s)
    if current:
        batches.append(torch.stack(current))
    return batches


def _non_layer_modules(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """Modules that run before layer 0 (embeddings, rotary tables ...): every sibling of the layer
    list inside its parent. The rest of the model stays where it is."""
    parent = next(m for m in model.modules() if any(c is layers for c in m.children()))
    return [c for c in parent.children() if c is not layers]


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, samples: Sequence[torch.Tensor], *, device: torch.device,
    batch_size: int = 8, cache_device: torch.device | None = None,
) -> list[LayerBatch]:
    """Run the model up to decoder layer 0 for every batch and return that layer's inputs."""
    layers, _ = find_decoder_layers(model)
    cache_device = cache_device or device
    captured: list[LayerBatch] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append(LayerBatch(hidden.detach().to(cache_device), _move(rest, cache_device)))
        raise _StopForward

    pre = _non_layer_modules(model, layers)
    homes = [_module_device(m) for m in pre]
    for m in pre:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batch_samples(samples, batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m, home in zip(pre, homes):
            if home is not None:
                m.to(home)
    return captured


def _module_device(m: nn.Module) -> torch.device | None:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return None


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def linear_names(layer: nn.Module, prefix: str, targets: Callable[[str], bool] | None) -> dict[str, nn.Linear]:
    found = {}
    for name, module in layer.named_modules():
        full = f"{prefix}.{name}"
        if isinstance(module, nn.Linear) and (targets is None or targets(full)):
            found[full] = module
    return found


@dataclass
class LayerSchedule:
    """How one decoder layer is walked: the linear groups in execution order, whether each group's
    members read one shared tensor, and for each child module (`self_attn`, `mlp` ...) how many
    groups must be finished before its output can no longer change (see `_ChildReplay`)."""

    groups: list[list[str]]
    shared: list[bool]
    child_ready: dict[str, int]


@torch.no_grad()
def probe_layer(layer: nn.Module, linears: dict[str, nn.Linear], batch: LayerBatch) -> LayerSchedule:
    """One probe forward on a single sample: group the linears that read the same input tensor, in
    the order they run, and note where each child module finishes relative to those linears.

    This is architecture-generic true-sequential ordering: for Llama it yields
    [q,k,v], [o], [gate,up], [down] without a per-architecture table. Linears never called in the
    probe (e.g. MoE experts no token was routed to) form a last, unshared group.
    """
    # Keep the input tensors themselves (not id()s): a freed tensor's id can be reused by the next
    # one, which would merge o_proj with gate/up.
    events: list[tuple[str, str, torch.Tensor | None]] = []
    handles = []
    for name, m in linears.items():
        def hook(mod, args, name=name):
            events.append(("linear", name, args[0]))
        handles.append(m.register_forward_pre_hook(hook))
    children = {n: c for n, c in layer.named_children() if any(isinstance(m, nn.Linear) for m in c.modules())}
    for cname, child in children.items():
        handles.append(child.register_forward_hook(lambda mod, a, o, cname=cname: events.append(("end", cname, None))))
    try:
        probe = LayerBatch(batch.hidden[:1], _slice_batch(batch.kwargs, batch.hidden.shape[0]))
        layer(probe.hidden, **probe.kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    keys: list[torch.Tensor] = []
    group_of: dict[str, int] = {}
    ends: dict[str, list[int]] = {}
    for kind, name, key in events:
        if kind == "end":
            ends.setdefault(name, []).append(len(groups))  # groups started before this child ended
            continue
        if name in group_of:
            continue
        if keys and keys[-1] is key:
            groups[-1].append(name)
        else:
            groups.append([name])
            keys.append(key)
        group_of[name] = len(groups) - 1
    shared = [True] * len(groups)
    rest = [n for n in linears if n not in group_of]
    if rest:
        groups.append(rest)
        shared.append(False)
    # A child called exactly once, whose every target linear ran before it ended, is fixed once all
    # groups begun by then are finished: its inputs come only from earlier (finished) linears.
    child_ready = {}
    for cname, child in children.items():
        mine = [f for f in linears if linears[f] in set(child.modules())]
        if len(ends.get(cname, ())) == 1 and all(f in group_of for f in mine):
            child_ready[cname] = ends[cname][0]
    return LayerSchedule(groups, shared, child_ready)


def sequential_groups(layer: nn.Module, linears: dict[str, nn.Linear], batch: LayerBatch) -> list[list[str]]:
    """The linear groups of `probe_layer`, in execution order."""
    return probe_layer(layer, linears, batch).groups


class _ChildReplay:
    """Reuse the outputs of a layer's children once they can no longer change.

    With true-sequential calibration a layer is run once per linear group plus once for its
    outputs, and every run recomputes the attention block even after q/k/v/o are final. A child
    whose linears are all finished and whose inputs come only from finished parts gives the same
    output in every later run, so the first such run records it (per batch) and later runs replay
    it: for Llama the attention block (projections + SDPA) runs 2 times fewer per layer. Callbacks
    may only rewrite the linears of the group they finish (the engine's contract), which is what
    makes this exact.
    """

    def __init__(self, layer: nn.Module, schedule: LayerSchedule, n_batches: int, store: torch.device):
        self.children = dict(layer.named_children())
        self.ready = schedule.child_ready
        self.last = len(schedule.groups)  # the output run
        self.n_batches = n_batches
        self.store = store
        self.saved: dict[str, list[Any]] = {}
        self.batch = 0

    def run(self, finished: int):
        """Context for one run over all batches after `finished` groups are final."""
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            patched = []
            for cname, ready in self.ready.items():
                child = self.children[cname]
                if finished < ready:
                    continue
                if len(self.saved.get(cname, ())) == self.n_batches:
                    forward = self._replay(cname)
                elif finished < self.last:  # a later run will replay what this one records
                    self.saved[cname] = []
                    forward = self._record(cname, child.forward)
                else:
                    continue
                patched.append((cname, child, child.__dict__.get("forward")))
                child.forward = forward
            try:
                yield
            finally:
                for cname, child, previous in patched:
                    if previous is None:
                        del child.forward
                    else:  # e.g. an accelerate offload hook's forward
                        child.forward = previous
                    if len(self.saved.get(cname, ())) != self.n_batches:
                        self.saved.pop(cname, None)  # an interrupted record is never replayed
        return ctx()

    def _record(self, cname: str, original: Callable[..., Any]):
        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            self.saved[cname].append(_copy(out, self.store))
            return out
        return forward

    def _replay(self, cname: str):
        def forward(*args, **kwargs):
            device = args[0].device if args and isinstance(args[0], torch.Tensor) else self.store
            return _copy(self.saved[cname][self.batch], device)
        return forward


def _copy(obj: Any, device: torch.device) -> Any:
    """A fresh copy on `device` (so in-place edits downstream never touch the cache)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, copy=True)
    if isinstance(obj, tuple):
        return tuple(_copy(o, device) for o in obj)
    if isinstance(obj, list):
        return [_copy(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _copy(v, device) for k, v in obj.items()}
    return obj


def _slice_batch(obj: Any, batch: int) -> Any:
    """First element along the batch dim of per-batch tensors (others, e.g. [1, T] ids, as is)."""
    if isinstance(obj, torch.Tensor):
        return obj[:1] if obj.dim() > 0 and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_slice_batch(o, batch) for o in obj)
    if isinstance(obj, list):
        return [_slice_batch(o, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_batch(v, batch) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _collect(layer: nn.Module, group: list[str], linears: dict[str, nn.Linear],
             inputs: list[LayerBatch], callback: Any, device: torch.device,
             stop_early: bool, shared: bool = False, replay: _ChildReplay | None = None,
             finished: int = 0) -> dict[str, int]:
    """Forward every batch through `layer`, handing the group's linear inputs to the callback.

    `stop_early` abandons each forward once the group has its inputs; with `shared` (the members
    read one tensor) that is at the first member's pre-hook, before any of them computes.
    """
    tokens = dict.fromkeys(group, 0)
    seen: set[str] = set()
    want = set(group)

    # Linears reading the same tensor (q/k/v, gate/up) get the same flattened object, so callbacks
    # can tell shared inputs apart by identity (`accumulate_hessian` computes their Hessian once).
    last: dict[str, torch.Tensor | None] = {"raw": None, "flat": None}

    def feed(name: str, x: torch.Tensor) -> None:
        if x is not last["raw"]:
            last["raw"], last["flat"] = x, x.reshape(-1, x.shape[-1])
        flat = last["flat"]
        tokens[name] += flat.shape[0]
        callback.add_batch(name, linears[name], flat)
        seen.add(name)

    def make_hook(name: str):
        def hook(mod, args):
            for member in (group if stop_early and shared else (name,)):
                feed(member, args[0])
            if stop_early and seen >= want:
                raise _StopForward
        return hook

    handles = [linears[n].register_forward_pre_hook(make_hook(n)) for n in group]
    try:
        with replay.run(finished) if replay is not None else _nothing():
            for i, batch in enumerate(inputs):
                seen.clear()
                if replay is not None:
                    replay.batch = i
                b = batch.to(device)
                try:
                    layer(b.hidden, **b.kwargs)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
        last.clear()
    return tokens


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


@torch.no_grad()
def run_layerwise(
    model: nn.Module, samples: Sequence[torch.Tensor], callback: Any, *,
    targets: Callable[[str], bool] | None = None, device: str | torch.device | None = None,
    true_sequential: bool = True, batch_size: int = 8, offload_inputs: bool = False,
    progress: Callable[[int, int], None] | None = None, reuse_outputs: bool = True,
) -> LayerwiseReport:
    """Walk the decoder layers with `samples` (1-D token tensors), calling `callback` (see module doc).

    `targets(full_name) -> bool` picks the linears handed to the callback (default: all).
    `offload_inputs` keeps the cached activations on CPU and moves one batch at a time.
    `reuse_outputs` replays finished child blocks instead of recomputing them (`_ChildReplay`;
    exact, it only saves time).
    """
    if not samples:
        raise DataError("no calibration samples.", where="calibration", hint="Provide at least one sample.")
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    layers, prefix = find_decoder_layers(model)
    was_training = model.training
    model.eval()
    cache_device = torch.device("cpu") if offload_inputs else device
    inputs = capture_layer_inputs(model, samples, device=device, batch_size=batch_size,
                                  cache_device=cache_device)
    report = LayerwiseReport(layers=len(layers), samples=len(samples),
                             tokens=sum(b.tokens for b in inputs), device=str(device))
    for i, layer in enumerate(layers):
        home = _module_device(layer)
        layer.to(device)
        linears = linear_names(layer, f"{prefix}.{i}", targets)
        if hasattr(callback, "begin_layer"):
            callback.begin_layer(i, layer, inputs)
        replay = None
        if linears:
            if true_sequential:
                plan = probe_layer(layer, linears, inputs[0].to(device))
                if reuse_outputs:
                    replay = _ChildReplay(layer, plan, len(inputs), cache_device)
            else:
                plan = LayerSchedule([list(linears)], [False], {})
            if i == 0:
                report.groups = plan.groups
            for g, group in enumerate(plan.groups):
                counts = _collect(layer, group, linears, inputs, callback, device, stop_early=true_sequential,
                                  shared=plan.shared[g], replay=replay, finished=g)
                for name, n in counts.items():
                    if n == 0:
                        report.unfed.append(name)
                        warnings.warn(f"{name} received no calibration activations; "
                                      "the method falls back to its data-free path for it", stacklevel=2)
                callback.finish_group(i, layer, group)
        outputs = []
        with replay.run(len(plan.groups)) if replay is not None else _nothing():
            for j, batch in enumerate(inputs):
                if replay is not None:
                    replay.batch = j
                b = batch.to(device)
                out = _layer_output(layer(b.hidden, **b.kwargs))
                outputs.append(LayerBatch(out.to(cache_device), batch.kwargs))
        if hasattr(callback, "end_layer"):
            callback.end_layer(i, layer)
        if home is not None and home != device:
            layer.to(home)
        inputs = outputs
        if progress is not None:
            progress(i + 1, len(layers))
    model.train(was_training)
    report.seconds = time.perf_counter() - t0
    report.peak_memory_mb, report.peak_memory_kind = peak_memory_mb(device)
    return report


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak accelerator memory on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


# ----------------------------------------------------------------------------- shared statistics


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over all calibration tokens (GPTQ/SparseGPT's proxy Hessian),
    kept in float32 whatever the model dtype, averaged so it does not grow with sample count.

    Wide inputs accumulate only the block upper triangle (about 60% of the multiply-adds for
    down_proj's 1536 or 14336 columns) and mirror it when `H` is read: the Hessian products are
    a large part of GPTQ's calibration time.
    """

    BLOCK = 256  # column block of the triangular update; narrower inputs use one full product

    def __init__(self, columns: int, device: torch.device | str):
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


def accumulate_hessian(hessians: dict[str, HessianAccumulator], name: str, module: nn.Linear, x: torch.Tensor) -> None:
    """The `add_batch` of every Hessian-based callback (GPTQ, SparseGPT): one accumulator per linear.

    Linears fed the very same tensor object (q/k/v, gate/up: the engine hands them one flattened
    input) share one accumulator, so X^T X is computed once per input rather than once per linear.
    Consumers only read `acc.H` (the solvers clone it), so sharing is safe.
    """
    acc = hessians.get(name)
    shared = hessians.get(_LAST_INPUT)
    if shared is not None and shared[0] is x and (acc is None or acc is shared[1]):
        hessians[name] = shared[1]  # already holds this batch
        return
    if acc is None:
        acc = hessians[name] = HessianAccumulator(module.in_features, x.device)
    acc.add(x)
    hessians[_LAST_INPUT] = (x, acc)  # type: ignore[assignment]


_LAST_INPUT = "\0last-input"  # a key no module name can take


@dataclass
class InverseHessian:
    """Upper Cholesky factor of H^-1 (what GPTQ/SparseGPT's column loop needs) and how it was damped."""

    chol_inv_upper: torch.Tensor
    damp_percent: float
    retries: int


def damped_inverse_cholesky(H: torch.Tensor, damp_percent: float = 0.01, *, max_retries: int = 6,
                            name: str = "") -> InverseHessian:
    """Cholesky of (H + damp*mean(diag H)*I)^-1, multiplying the damping by 10 on failure.

    A Hessian that is not positive definite (too few tokens, duplicated or dead input channels,
    `damp_percent=0`) is retried with more damping and reported as a warning, never returned as NaN.
    """
    H = H.clone()
    n = H.shape[0]
    mean_diag = torch.mean(torch.diag(H)).item()
    if not math.isfinite(mean_diag):
        raise FloatingPointError(f"{name}: Hessian contains NaN/inf (non-finite activations)")
    mean_diag = mean_diag if mean_diag > 0 else 1.0
    damp = damp_percent
    idx = torch.arange(n, device=H.device)
    for attempt in range(max_retries + 1):
        Hd = H.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(U).all() and bool((torch.diag(U) > 0).all()):
                if attempt:
                    warnings.warn(f"{name}: Hessian not positive definite with damp_percent="
                                  f"{damp_percent}; succeeded with damp_percent={damp:g} "
                                  f"after {attempt} retr{'y' if attempt == 1 else 'ies'}", stacklevel=2)
                return InverseHessian(U, damp, attempt)
        damp = damp * 10 if damp > 0 else 1e-4
    raise FloatingPointError(f"{name}: Hessian could not be inverted even with damp_percent={damp / 10:g}")
