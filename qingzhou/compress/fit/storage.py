"""Exact bytes of one linear in the GPTQ checkpoint layout, for every option `fit` may choose.

`fit` trades loss against the size of the file the export writes, so the cost of an option must be
the bytes `save_quantized` actually writes, scales and zeros included, not `bits/8 * weights`:
at 2 bits and group 32 the fp16 scales and packed zeros add ~25% on top of the codes. The formula
follows `llm/quantized/pack.py` and `gptq_layout.py` exactly:

* `qweight` int32 [ceil(in/32) * bits, out]  (codes packed along the input dim, padded to 32 values);
* `qzeros`  int32 [groups, ceil(out/32) * bits]  (zero points packed along the output dim);
* `scales`  float16 [groups, out];
* `g_idx`   int32 [in];
* `bias`    [out] in 16 bits, like every float tensor the writer stores (`gptq_layout.storage_dtype`).

`keep` leaves the linear dense: weight (and bias) in 16 bits. The packing arithmetic and
the group count come from the runtime itself (`pack.packed_rows`, `QuantScheme.groups`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qingzhou.llm.quantized.grid import QuantScheme
from qingzhou.llm.quantized.pack import packed_rows  # the packing's own arithmetic, not a copy of it

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

INT32, FP16 = 4, 2
STORED_FLOAT = 2  # bytes per float element in the file: `save_quantized` stores float16/bfloat16
BITS = (2, 3, 4, 8)  # the widths every GPTQ runtime loads
GROUP_SIZES = (32, 64, 128, -1)  # the group sizes exllama/marlin/vLLM and torch's kernel accept


@dataclass(frozen=True, order=True)
class Option:
    """One choice for one linear: `bits` (None = keep dense) and `group_size` (-1 = per channel)."""

    bits: int | None = None
    group_size: int = -1

    @property
    def keep(self) -> bool:
        return self.bits is None

    @property
    def label(self) -> str:
        return "keep" if self.bits is None else f"w{self.bits}g{self.group_size}"


KEEP = Option()


def linear_bytes(in_features: int, out_features: int, option: Option, *, bias_bytes: int = 0,
                 dtype_bytes: int = STORED_FLOAT) -> int:
    """Bytes `save_quantized` writes for one linear under `option`.

    `bias_bytes`: bytes per bias element (0 = no bias); `dtype_bytes`: bytes per dense weight
    element (used by `keep`)."""
    bias = out_features * bias_bytes
    if option.keep:
        return in_features * out_features * dtype_bytes + bias
    bits = int(option.bits)  # type: ignore[arg-type]
    groups = QuantScheme(bits=bits, group_size=option.group_size).groups(in_features)
    qweight = packed_rows(in_features, bits) * out_features * INT32
    qzeros = groups * packed_rows(out_features, bits) * INT32
    scales = groups * out_features * FP16
    g_idx = in_features * INT32
    return qweight + qzeros + scales + g_idx + bias


def option_space(bits: Iterable[int] = BITS, group_sizes: Iterable[int] = GROUP_SIZES,
                 keep: bool = True) -> list[Option]:
    """Every (bits, group size) pair, plus `keep` if asked."""
    out = [Option(b, g) for b in bits for g in group_sizes]
    return out + [KEEP] if keep else out


def options_for(in_features: int, options: Iterable[Option]) -> list[Option]:
    """The options one linear can take: group sizes that divide its input width (or -1), so the
    checkpoint loads in every GPTQ runtime and no `on_indivisible_group` fallback changes the cost
    behind the solver's back. A group as wide as the input is the same layout as -1; it is dropped
    when -1 is offered, so the solver sees no duplicate."""
    opts = list(options)
    per_channel = any(not o.keep and o.group_size == -1 for o in opts)
    out = []
    for o in opts:
        if o.keep or o.group_size == -1:
            out.append(o)
        elif in_features % o.group_size == 0 and not (per_channel and o.group_size == in_features):
            out.append(o)
    return out


def model_bytes(model: nn.Module, choices: Mapping[str, Option]) -> int:
    """Bytes of all tensors `save_quantized` writes for `model` with linear `name` stored as
    `choices[name]` (the safetensors payload; the file adds its JSON header and 8 bytes).

    Tied tensors count once, as `save_quantized` drops the second name."""
    modules = dict(model.named_modules())
    total = 0
    seen: set[int] = set()
    replaced = {f"{n}.{p}" for n, o in choices.items() if not o.keep for p in ("weight", "bias")}
    for key, t in model.state_dict().items():
        ptr = t.data_ptr() if t.numel() else id(t)
        if t.numel() and ptr in seen:
            continue
        seen.add(ptr)
        if key not in replaced:
            total += t.numel() * (STORED_FLOAT if t.is_floating_point() else t.element_size())
    for name, option in choices.items():
        if option.keep:
            continue
        lin = modules[name]
        bias = STORED_FLOAT if getattr(lin, "bias", None) is not None else 0
        total += linear_bytes(lin.in_features, lin.out_features, option, bias_bytes=bias)
    return total
