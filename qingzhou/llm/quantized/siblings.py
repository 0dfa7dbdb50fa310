"""One int4 matmul for the 4-bit linears that read the same input (q/k/v, gate/up).

At batch 1 a decode step on a CPU is bound by per-call costs, not by arithmetic: every 4-bit
linear casts its input to bf16, calls the packed int4 kernel (whose threads split the output
columns, so the small k/v projections use them poorly) and casts back. A Llama-family layer calls
q, k and v on the same hidden state, and gate and up on the same normed state; serving engines
(vLLM's QKVParallelLinear / MergedColumnParallelLinear, llama.cpp's fused ops) compute each such
set as one matmul over the concatenated output columns. `fuse_siblings` does the same without
touching the model's code: the linears of a set share a `SiblingGroup`; the first of them called
with an input computes the whole set's output in one kernel call, the others take their columns of
it when they are called with that very tensor (same object, not modified in place since, as far
as torch counts: inference-mode tensors keep no counter) before the set is complete. Each
output column is the same dot product as before, so the logits are the unfused ones
(tests/test_quant_siblings.py).

Only the fused route changes: training (autograd), `kernel="dequant"` layers, layers the kernel
cannot take and offloaded (streamed) layers run as before, each on its own. The group keeps the
fused pack instead of the members' own packs (no extra memory); `clear_runtime` on any member
drops it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qingzhou.llm.quantized.int4_kernel import Int4Pack
from qingzhou.llm.quantized.pack import unpack_qweight
from qingzhou.llm.quantized.qlinear import QuantLinear

# child names that read one input, per parent module (Llama, Mistral, Qwen2, Gemma 3 use these names)
SIBLING_SETS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SiblingGroup:
    """The fused int4 pack of a set of `QuantLinear`s and the last input it was computed for."""

    def __init__(self, members: list[QuantLinear]):
        self.members = members
        # by position, never by id(): a deep-copied model copies the group with its members
        bounds, start = [], 0
        for m in members:
            bounds.append((start, start + m.out_features))
            start += m.out_features
        self.bounds = bounds
        self._packs: dict[tuple[torch.device, torch.dtype], Int4Pack | None] = {}
        self._x: torch.Tensor | None = None
        self._version = -1
        self._y: torch.Tensor | None = None
        self._waiting: set[int] = set()

    def clear(self) -> None:
        self._packs.clear()
        self._x = self._y = None
        self._waiting = set()

    def _pack(self, device: torch.device, dtype: torch.dtype) -> Int4Pack | None:
        key = (device, dtype)
        if key not in self._packs:
            ms = self.members
            codes = torch.cat([unpack_qweight(m.qweight, m.bits, m.in_features) for m in ms], dim=0)
            zeros = torch.cat([m.zero_points() for m in ms], dim=1)
            scales = torch.cat([m.scales for m in ms], dim=1)
            qweight = torch.cat([m.qweight for m in ms], dim=1)
            self._packs[key] = Int4Pack.build(codes, scales, zeros, ms[0].g_idx, ms[0].group_size, device, dtype,
                                              qweight=qweight)
        return self._packs[key]

    def output(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
        """`layer`'s output columns of the fused matmul of `x` (computed once per input), or None
        where the fused kernel does not run for this device and dtype."""
        k = next((i for i, m in enumerate(self.members) if m is layer), None)
        if k is None:  # not one of this group's layers (a copy holding a stale group): compute alone
            return None
        lo, hi = self.bounds[k]
        version = _version(x)
        if not (x is self._x and version == self._version and k in self._waiting):
            pack = self._pack(x.device, x.dtype)
            if pack is None:
                return None
            self._y = pack(x)
            self._x, self._version = x, version
            self._waiting = set(range(len(self.members)))
        self._waiting.discard(k)
        y = self._y[..., lo:hi].contiguous()
        if not self._waiting:  # the whole set is served: hold no activations between steps
            self._x = self._y = None
        return y


def _version(x: torch.Tensor) -> int:
    """The tensor's in-place modification counter; inference-mode tensors keep none (-1), so under
    `torch.inference_mode` only the identity of the input and the set's call order guard reuse."""
    return -1 if x.is_inference() else x._version


def _fusable(members: list[Any]) -> bool:
    """4-bit QuantLinears on one real device with one input width, group size and column order,
    in memory (not streamed by an offload hook), computing through the kernel."""
    if len(members) < 2 or not all(isinstance(m, QuantLinear) for m in members):
        return False
    first = members[0]
    return all(m.bits == 4 and m.kernel == "auto" and m.in_features == first.in_features
               and m.group_size == first.group_size and m.qweight.device == first.qweight.device
               and m.qweight.device.type != "meta" and not m.qzeros_v2 and not hasattr(m, "_hf_hook")
               and torch.equal(m.g_idx, first.g_idx) for m in members)


def fuse_siblings(model: nn.Module) -> int:
    """Give each set of sibling 4-bit linears (SIBLING_SETS) a shared `SiblingGroup`; returns how
    many sets were fused. Idempotent; `unfuse_siblings` undoes it."""
    fused = 0
    for parent in model.modules():
        for names in SIBLING_SETS:
            members = [getattr(parent, n, None) for n in names]
            if not _fusable(members):
                continue
            if all(m.siblings is not None and m.siblings.members == members for m in members):
                fused += 1
                continue
            group = SiblingGroup(members)
            for m in members:
                m.clear_runtime()
                m.siblings = group
            fused += 1
    return fused


def unfuse_siblings(model: nn.Module) -> None:
    """Every QuantLinear computes on its own again."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.siblings is not None:
            m.siblings = None
            m.clear_runtime()
