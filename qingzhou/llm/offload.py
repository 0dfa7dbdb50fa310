"""Offloaded inference: layers that do not fit stream in, the next one while this one computes.

accelerate's offload hooks (`AlignDevicesHook`, attached by `dispatch_model`) already swap an
offloaded layer's tensors in before its forward and back to meta after it. What they do not do is
overlap: each tensor is read (and, on an accelerator, copied) only when its layer starts. The
`Streamer` here is what those hooks read through instead of accelerate's `OffloadedWeightsLoader`:
when layer i starts, it releases layer i-1's pages and starts a background thread on layer i+1
(wrapping to the first streamed layer, for the next token):

- CPU compute: the tensors are zero-copy views of the memory-mapped shards; the thread faults the
  next layer's pages in (madvise POPULATE_READ, without the GIL), so the compute reads page-cache
  memory that is already mapped. Finished layers' pages are handed back (MADV_DONTNEED): the
  resident set stays at the resident layers plus about two streamed ones.
- accelerator compute: the thread copies the next layer's tensors to the device on a side stream
  of the device layer (`devices.side_stream`); the compute stream waits on that copy's event only
  when the layer starts.

Quantized (GPTQ-layout) layers stream their packed buffers: a quarter of the bytes of bf16.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from qingzhou.llm.bigload import ShardIndex


class Streamer:
    """Serves the tensors of the streamed modules to accelerate's hooks, one module ahead."""

    def __init__(self, index: ShardIndex, modules: list[str], device: str, dtypes: dict[str, torch.dtype],
                 prefetch: bool = True):
        from qingzhou.llm.devices import side_stream

        self.index, self.modules, self.device = index, modules, torch.device(device)
        self.dtypes = dtypes  # tensor name -> the dtype the model computes it in
        self.names = {m: index.layer_names(m) for m in modules}
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qingzhou-prefetch") if prefetch else None
        self._stream = side_stream(self.device)
        self._pending: dict[str, Future] = {}
        self._current: str | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.loads = 0  # how many module loads were served (for tests and reports)

    def _load(self, module: str) -> tuple[dict[str, torch.Tensor], Any]:
        names = self.names[module]
        if self.device.type == "cpu":
            self.index.prefetch(names)
            return {n: self._cast(n, self.index.tensor(n)) for n in names}, None
        from qingzhou.llm.devices import record_event, stream_context

        with stream_context(self._stream):
            out = {n: self._cast(n, self.index.tensor(n)).to(self.device, non_blocking=True) for n in names}
            event = record_event(self._stream)
        return out, event

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        want = self.dtypes.get(name, t.dtype)
        return t.to(want) if t.is_floating_point() and want != t.dtype else t

    def _submit(self, module: str) -> None:
        if self._pool is not None and module not in self._pending:
            self._pending[module] = self._pool.submit(self._load, module)

    def get(self, module: str, name: str) -> torch.Tensor:
        with self._lock:
            if module != self._current:
                self._enter(module)
            return self._tensors[f"{module}.{name}"]

    def _enter(self, module: str) -> None:
        previous = self._current
        fut = self._pending.pop(module, None)
        tensors, event = fut.result() if fut is not None else self._load(module)
        if event is not None:
            from qingzhou.llm.devices import wait_event

            wait_event(self.device, event)
        self._tensors = tensors
        self._current = module
        self.loads += 1
        if previous is not None and self.device.type == "cpu":
            self.index.release(self.names[previous])
        i = self.modules.index(module)
        self._submit(self.modules[(i + 1) % len(self.modules)])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pending.clear()
        self._tensors = {}


class StreamedWeights:
    """The mapping an accelerate `AlignDevicesHook` reads an offloaded module's tensors from."""

    def __init__(self, streamer: Streamer, module: str):
        self.streamer, self.module = streamer, module

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.streamer.get(self.module, name)

    def __contains__(self, name: str) -> bool:
        return f"{self.module}.{name}" in self.streamer.index

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def keys(self):
        p = len(self.module) + 1
        return [n[p:] for n in self.streamer.names[self.module]]


def attach_streamer(model: nn.Module, index: ShardIndex, modules: list[str], device: str,
                    prefetch: bool = True) -> Streamer:
    """Point the accelerate hooks of `modules` (already dispatched as offloaded) at a Streamer."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    dtypes = {n: t.dtype for n, t in _declared_dtypes(model, index, modules).items()}
    # forward order; modules without checkpoint tensors (rotary embeddings) are never asked for
    order = [m for m, _ in model.named_modules() if m in set(modules) and index.layer_names(m)]
    streamer = Streamer(index, order, device, dtypes, prefetch=prefetch)
    for name in order:
        hook = getattr(model.get_submodule(name), "_hf_hook", None)
        hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
        for h in hooks:
            if isinstance(h, AlignDevicesHook) and h.offload:
                h.weights_map = StreamedWeights(streamer, name)
    model.qingzhou_streamer = streamer
    return streamer


def _declared_dtypes(model: nn.Module, index: ShardIndex, modules: list[str]) -> dict[str, torch.Tensor]:
    """The meta tensors the model declares for the streamed names (their dtype is what to compute in)."""
    out = {}
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    for m in modules:
        for n in index.layer_names(m):
            if n in state:
                out[n] = state[n]
    return out
