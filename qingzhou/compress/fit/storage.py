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


def model_bytes(model: nn.Module, choices: Mapping[str, Option], *, dropped: Iterable[str] = ()) -> int:
    """Bytes of all tensors `save_quantized` writes for `model` with linear `name` stored as
    `choices[name]` (the safetensors payload; the file adds its JSON header and 8 bytes), without
    the modules named in `dropped` (whole decoder layers a plan removes).

    Tied tensors count once, as `save_quantized` drops the second name."""
    modules = dict(model.named_modules())
    total = 0
    seen: set[int] = set()
    replaced = {f"{n}.{p}" for n, o in choices.items() if not o.keep for p in ("weight", "bias")}
    gone = tuple(f"{d}." for d in dropped)
    for key, t in model.state_dict().items():
        ptr = t.data_ptr() if t.numel() else id(t)
        if t.numel() and ptr in seen:
            continue
        seen.add(ptr)
        if key not in replaced and not (gone and key.startswith(gone)):
            total += t.numel() * (STORED_FLOAT if t.is_floating_point() else t.element_size())
    for name, option in choices.items():
        if option.keep:
            continue
        lin = modules[name]
        bias = STORED_FLOAT if getattr(lin, "bias", None) is not None else 0
        total += linear_bytes(lin.in_features, lin.out_features, option, bias_bytes=bias)
    return total


# safetensors' dtype names (the header's "dtype" strings)
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32",
              "int64": "I64", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
METADATA = {"format": "pt", "quantizer": "qingzhou"}  # what `save_quantized` writes


def linear_tensors(name: str, in_features: int, out_features: int, option: Option, *, bias_dtype: str | None,
                   dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(tensor name, safetensors dtype, shape) of each tensor one linear writes under `option`."""
    bias = [(f"{name}.bias", bias_dtype, (out_features,))] if bias_dtype else []
    if option.keep:
        return [(f"{name}.weight", dtype, (out_features, in_features)), *bias]
    bits = int(option.bits)  # type: ignore[arg-type]
    groups = QuantScheme(bits=bits, group_size=option.group_size).groups(in_features)
    return [(f"{name}.qweight", "I32", (packed_rows(in_features, bits), out_features)),
            (f"{name}.qzeros", "I32", (groups, packed_rows(out_features, bits))),
            (f"{name}.scales", "F16", (groups, out_features)),
            (f"{name}.g_idx", "I32", (in_features,)), *bias]


def header_bytes_bound(model: nn.Module, options: Mapping[str, Iterable[Option]]) -> int:
    """An upper bound on what `model.safetensors` adds to its payload (8-byte length + JSON header,
    padded to 8) for any plan giving linear `name` one of `options[name]`.

    The header lists every tensor with its dtype, shape and byte offsets; it is bounded by writing
    each entry with the widest of its options' shapes and offsets as long as the largest possible
    file. For SmolLM2 it is ~60 KB against an 80 MB budget, but a budget must hold exactly."""
    import json

    modules = dict(model.named_modules())
    fitted = set(options)
    tensors: list[tuple[str, str, tuple[int, ...]]] = []
    payload = 0
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        ptr = t.data_ptr() if t.numel() else id(t)
        if t.numel() and ptr in seen:
            continue
        seen.add(ptr)
        payload += t.numel() * t.element_size()
        if key.rpartition(".")[0] not in fitted:
            tensors.append((key, _st_dtype(t.dtype), tuple(t.shape)))
    digits = len(str(4 * payload + 2**20))  # no plan is 4x the dense fp payload (8-bit + scales < 32 bits)

    def size(entries: Iterable[tuple[str, str, tuple[int, ...]]]) -> int:
        # each entry, its two offsets at `digits` digits, and the comma after it
        return sum(_entry_len(n, d, s) + 2 * digits + 1 for n, d, s in entries)

    total = size(tensors)
    for name, opts in options.items():
        lin = modules[name]
        bias = _st_dtype(lin.bias.dtype) if getattr(lin, "bias", None) is not None else None
        total += max(size(linear_tensors(name, lin.in_features, lin.out_features, o, bias_dtype=bias,
                                         dtype=_st_dtype(lin.weight.dtype))) for o in opts)
    meta = len(json.dumps({"__metadata__": METADATA}, separators=(",", ":")))  # with the braces
    return 8 + total + meta + 7  # length prefix, entries, metadata and braces, padding to 8


def _st_dtype(dtype: object) -> str:
    return _ST_DTYPES.get(str(dtype).removeprefix("torch."), "BF16")


def _entry_len(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Length of `"name":{"dtype":"..","shape":[..],"data_offsets":[,]}` without the offsets' digits."""
    import json

    return len(json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": []}},
                          separators=(",", ":"))) - 2 + 1
