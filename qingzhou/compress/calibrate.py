"""The one layer-by-layer calibration engine shared by every calibrated method (GPTQ, AWQ, SmoothQuant,
SparseGPT, Wanda, OWL, structured pruning, MoEfication).

Why layer by layer: a method only needs, for each linear layer, statistics of *its own inputs* as
they are after every earlier layer has already been compressed. So we run the embeddings once,
capture the inputs of decoder layer 0, and then walk the layers: move layer i to the device, feed
it the cached inputs, hand each linear's inputs to the method, let the method rewrite the weights,
recompute layer i's outputs with the rewritten weights, and use them as layer i+1's inputs. Only one
layer (plus its inputs) ever sits on the accelerator, so a model several times larger than device
memory calibrates, and errors of earlier layers are seen (and compensated) by later ones.

How it is called::

    report = run_layerwise(model, samples, callback, LayerwiseOptions.from_config(cfg, targets=plan.__contains__))

`LayerwiseOptions` says where and how (device, true-sequential groups, batch size, CPU offload
of the cached activations, which linears); `LayerwiseOptions.from_config` reads those fields from
any method config. The callback follows `LayerwiseCallback` (required: `add_batch`, `finish_group`)
and may add the hooks of `LayerHooks` (`inputs_to_observe` + `observe`, `begin_layer`,
`end_layer`). Per decoder layer the engine calls, in this order:

1. `inputs_to_observe(index, layer)` -> names inside the layer (`self_attn.q_proj`, `mlp` ...):
   one pass over the layer's cached inputs, on its weights as they are, hands each named
   submodule's input to `observe(name, module, x)` (x: [tokens, features]). AWQ and SmoothQuant
   take their scaling statistics here instead of walking the layer themselves.
2. `begin_layer(index, layer, inputs)` (inputs: list[LayerBatch]); e.g. fold scales.
3. per linear group: `add_batch(name, module, x)` for every batch (x: the linear's input
   [tokens, in_features] on the device; linears reading one tensor get the same object), then
   `finish_group(index, layer, modules)` with `modules` = {full name: nn.Linear} of the group
   (names that got no tokens are included; see `report.unfed`). The callback may rewrite only the
   weights of these modules, in place (or replace them in the layer).
4. `refine_layer(index, layer, inputs)`, after every group is finished and before the outputs are
   computed: a last pass over the whole layer (block tuning); returns True if it changed weights.
5. `end_layer(index, layer)`, after the layer's outputs (the next layer's inputs) are computed.

Full names are those `model.named_modules()` gives (`model.layers.3.self_attn.q_proj`), so methods
key per-module settings by them. With `true_sequential=True` a layer's linears are processed in
groups that share one input tensor, in execution order (Llama: q/k/v, then o, then gate/up, then
down), and each group sees inputs produced by the already-compressed earlier groups; otherwise all
linears of the layer are collected in one pass and finished together. Methods that solve each
linear from its inputs' Hessian subclass `compress.hessian.HessianCollector`.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from qingzhou.errors import DataError, ModelLoadError
from qingzhou.llm.devices import (
    peak_memory_mb,
    peak_memory_source,
    reset_peak_memory,
    torch_device,
)
from qingzhou.llm.quantized.grid import QuantizedWeight

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


def _tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """`fn` applied to every tensor inside nested tuples, lists and dicts (the layer kwargs)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_tree_map(fn, o) for o in obj)
    if isinstance(obj, list):
        return [_tree_map(fn, o) for o in obj]
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return obj


def _move(obj: Any, device: torch.device | str) -> Any:
    return _tree_map(lambda t: t.to(device), obj)


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
    return _tree_map(lambda t: t.to(device, copy=True), obj)


def _slice_batch(obj: Any, batch: int) -> Any:
    """First element along the batch dim of per-batch tensors (others, e.g. [1, T] ids, as is)."""
    return _tree_map(lambda t: t[:1] if t.dim() > 0 and t.shape[0] == batch and batch > 1 else t, obj)


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input tensor of a module call: the first positional argument, else `hidden_states`
    (HF decoder layers call their attention and MLP blocks with keywords), else the first tensor."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


@torch.no_grad()
def _collect(layer: nn.Module, modules: dict[str, nn.Module], inputs: list[LayerBatch],
             sink: Callable[[str, Any, torch.Tensor], None], device: torch.device, stop_early: bool,
             shared: bool = False, replay: _ChildReplay | None = None, finished: int = 0) -> dict[str, int]:
    """Forward every batch through `layer`, handing each of `modules`' inputs, flattened to
    [tokens, features], to `sink(name, module, x)`; returns the tokens each received.

    `stop_early` abandons each forward once every module has its inputs; with `shared` (the members
    read one tensor) that is at the first member's pre-hook, before any of them computes.
    """
    group = list(modules)
    tokens = dict.fromkeys(group, 0)
    seen: set[str] = set()
    want = set(group)

    # Linears reading the same tensor (q/k/v, gate/up) get the same flattened object, so callbacks
    # can tell shared inputs apart by identity (`HessianStore` computes their Hessian once).
    last: dict[str, torch.Tensor | None] = {"raw": None, "flat": None}

    def feed(name: str, x: torch.Tensor) -> None:
        if x is not last["raw"]:
            last["raw"], last["flat"] = x, x.reshape(-1, x.shape[-1])
        flat = last["flat"]
        tokens[name] += flat.shape[0]
        sink(name, modules[name], flat)
        seen.add(name)

    def make_hook(name: str):
        def hook(mod, args, kwargs):
            x = _first_input(args, kwargs)
            for member in (group if stop_early and shared else (name,)):
                feed(member, x)
            if stop_early and seen >= want:
                raise _StopForward
        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n), with_kwargs=True) for n in group]
    try:
        with replay.run(finished) if replay is not None else nullcontext():
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


class LayerwiseCallback(Protocol):
    """What `run_layerwise` requires of a method (see the module doc for the order of calls).

    Optional hooks are listed in `LayerHooks`; the engine calls those a callback defines.
    """

    def add_batch(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        """One batch of a linear's inputs, `x` [tokens, in_features] on the calibration device.
        Linears reading one tensor (q/k/v) get the same object, so statistics can be shared."""

    def finish_group(self, index: int, layer: nn.Module, modules: dict[str, nn.Linear]) -> None:
        """All inputs of the group `modules` ({full name: linear}, in execution order) are in:
        rewrite (or replace) these linears. Only these: later groups and the replayed child
        blocks rely on it."""


class LayerHooks(Protocol):
    """Optional callback hooks, called when the callback defines them."""

    def inputs_to_observe(self, index: int, layer: nn.Module) -> Sequence[str]:
        """Submodules of `layer` (names inside it, e.g. `self_attn.q_proj`, `mlp`) whose inputs the
        callback wants to see once, on the layer's weights before `begin_layer` and any group."""

    def observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """One batch of an observed submodule's input, [tokens, features], as the model computes it."""

    def begin_layer(self, index: int, layer: nn.Module, inputs: list[LayerBatch]) -> None:
        """Before the layer's groups are collected (after the observation pass)."""

    def refine_layer(self, index: int, layer: nn.Module, inputs: list[LayerBatch]) -> bool:
        """After all groups are finished, before the outputs are computed; may rewrite any linear
        of the layer. Returns True when it changed weights (recorded child outputs are dropped)."""

    def end_layer(self, index: int, layer: nn.Module) -> None:
        """After the layer's outputs, the next layer's inputs, are computed."""

    carries: bool  # true when the callback carries activations of its own between layers

    def carried(self) -> list[torch.Tensor] | None:
        """Per-batch tensors shaped like the hidden states that the callback carries into the next
        layer (after `end_layer`); a streamed run checkpoints them with the layer."""

    def restore_carried(self, tensors: list[torch.Tensor]) -> None:
        """A resumed streamed run hands back what `carried` returned after the last finished layer."""


class EngineSettings(Protocol):
    """The fields every calibrated method config carries (quantize, prune, moefy, structured)."""

    device: str | None
    batch_size: int
    offload_inputs: bool


@dataclass(frozen=True)
class LayerwiseOptions:
    """How `run_layerwise` walks the model.

    `device`: where each layer runs (None: the best available, `llm.devices.resolve_device`).
    `targets(full_name) -> bool`: the linears handed to the callback (None: all).
    `true_sequential`: groups in execution order, each on inputs after the earlier groups.
    `batch_size`: calibration samples per forward. `offload_inputs`: keep the cached activations
    on CPU and move one batch at a time. `reuse_outputs`: replay finished child blocks instead of
    recomputing them (`_ChildReplay`; exact, it only saves time). `progress(done, total)`: called
    after each layer. `stream`: a `compress.streaming.LayerStream` for a model on the meta device
    (each layer materialised before and written + released after; None: the stream a verb opened
    with `streaming.streaming_layers`, if any).
    """

    device: str | torch.device | None = None
    targets: Callable[[str], bool] | None = None
    true_sequential: bool = True
    batch_size: int = 8
    offload_inputs: bool = False
    reuse_outputs: bool = True
    progress: Callable[[int, int], None] | None = None
    stream: Any = None

    @classmethod
    def from_config(cls, cfg: EngineSettings, **overrides: Any) -> LayerwiseOptions:
        """The options a method config asks for (`device`, `batch_size`, `offload_inputs`, and
        `true_sequential` where the method has it), with `overrides` (e.g. `targets=`) on top."""
        fields: dict[str, Any] = {"device": cfg.device, "batch_size": cfg.batch_size,
                                  "offload_inputs": cfg.offload_inputs}
        if hasattr(cfg, "true_sequential"):
            fields["true_sequential"] = cfg.true_sequential
        return cls(**{**fields, **overrides})


@torch.no_grad()
def run_layerwise(model: nn.Module, samples: Sequence[torch.Tensor], callback: LayerwiseCallback,
                  options: LayerwiseOptions | None = None) -> LayerwiseReport:
    """Walk the decoder layers with `samples` (1-D token tensors), calling `callback` (see the
    module doc) as `options` say. Raises `DataError` without samples and `DeviceError` for a
    device that is not available here."""
    opts = options or LayerwiseOptions()
    if not samples:
        raise DataError("no calibration samples.", where="calibration", hint="Provide at least one sample.")
    t0 = time.perf_counter()
    device = torch_device(opts.device)
    reset_peak_memory(device)
    layers, prefix = find_decoder_layers(model)
    was_training = model.training
    model.eval()
    cache_device = torch.device("cpu") if opts.offload_inputs else device
    stream = opts.stream if opts.stream is not None else active_stream()
    if stream is not None:
        stream.before_capture(model)
    inputs = capture_layer_inputs(model, samples, device=device, batch_size=opts.batch_size,
                                  cache_device=cache_device)
    start = 0
    if stream is not None:
        start, inputs = stream.after_capture(model, inputs)
        if 0 < start < len(layers) and getattr(callback, "carries", False):
            callback.restore_carried(stream.read_carried(start))
    report = LayerwiseReport(layers=len(layers), samples=len(samples),
                             tokens=sum(b.tokens for b in inputs), device=str(device))
    observe_names = getattr(callback, "inputs_to_observe", None)
    begin_layer = getattr(callback, "begin_layer", None)
    end_layer = getattr(callback, "end_layer", None)
    refine_layer = getattr(callback, "refine_layer", None)
    for i, layer in enumerate(layers):
        if i < start:  # resumed: written by an earlier, interrupted run
            continue
        if stream is not None:
            stream.load(i, layer)
        home = _module_device(layer)
        layer.to(device)
        linears = linear_names(layer, f"{prefix}.{i}", opts.targets)
        observed = list(observe_names(i, layer)) if observe_names is not None else []
        if observed:
            _collect(layer, {n: layer.get_submodule(n) for n in observed}, inputs, callback.observe,
                     device, stop_early=True)
        if begin_layer is not None:
            begin_layer(i, layer, inputs)
        replay = None
        plan = LayerSchedule([], [], {})
        if linears:
            if opts.true_sequential:
                plan = probe_layer(layer, linears, inputs[0].to(device))
                if opts.reuse_outputs:
                    replay = _ChildReplay(layer, plan, len(inputs), cache_device)
            else:
                plan = LayerSchedule([list(linears)], [False], {})
            if i == 0:
                report.groups = plan.groups
            for g, group in enumerate(plan.groups):
                modules = {n: linears[n] for n in group}
                counts = _collect(layer, modules, inputs, callback.add_batch, device,
                                  stop_early=opts.true_sequential, shared=plan.shared[g], replay=replay, finished=g)
                for name, n in counts.items():
                    if n == 0:
                        report.unfed.append(name)
                        warnings.warn(f"{name} received no calibration activations; "
                                      "the method falls back to its data-free path for it", stacklevel=2)
                callback.finish_group(i, layer, modules)
        if refine_layer is not None and refine_layer(i, layer, inputs):
            replay = None  # recorded child outputs predate the refined weights
        outputs = []
        with replay.run(len(plan.groups)) if replay is not None else nullcontext():
            for j, batch in enumerate(inputs):
                if replay is not None:
                    replay.batch = j
                b = batch.to(device)
                out = _layer_output(layer(b.hidden, **b.kwargs))
                kept = out.to(cache_device) if stream is None else stream.keep(i, j, out, cache_device)
                outputs.append(LayerBatch(kept, batch.kwargs))
        if end_layer is not None:
            end_layer(i, layer)
        if home is not None and home != device:
            layer.to(home)
        if stream is not None:
            stream.finish(i, layer, callback)
        inputs = outputs
        if opts.progress is not None:
            opts.progress(i + 1, len(layers))
    model.train(was_training)
    report.seconds = time.perf_counter() - t0
    report.peak_memory_mb, report.peak_memory_kind = peak_memory_mb(device), peak_memory_source(device)
    return report


# The stream a verb opened around its method: methods build their own LayerwiseOptions, so the
# verb hands its `compress.streaming.LayerStream` to `run_layerwise` this way, callbacks unchanged.
_ACTIVE: ContextVar[Any] = ContextVar("qingzhou_layer_stream", default=None)


def active_stream() -> Any:
    """The stream opened by `streaming_layers` around the running method, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def streaming_layers(stream: Any) -> Iterator[Any]:
    """Within the block, `run_layerwise` walks `stream`'s layers (see `compress.streaming`)."""
    token = _ACTIVE.set(stream)
    try:
        yield stream
    finally:
        _ACTIVE.reset(token)


@torch.no_grad()
def write_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy a rewritten weight into `module` in place, in the module's own device and dtype (what
    every callback does in `finish_group`)."""
    module.weight.copy_(weight.to(module.weight.device, module.weight.dtype))


def apply_quantized(module: nn.Module, qw: QuantizedWeight) -> QuantizedWeight:
    """Write `qw`'s dequantised weight into `module` in place (dense fake-quant, what packing
    later encodes) and return `qw`."""
    write_weight(module, qw.dequantize())
    return qw
