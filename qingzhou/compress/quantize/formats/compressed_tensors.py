"""Write a compressed model in the compressed-tensors layout (what llm-compressor writes, vLLM prefers).

Which layout each linear gets, from what the model holds (no setting to get wrong):
* `QuantLinear` (RTN/GPTQ/AWQ, packed) -> `pack-quantized`: `weight_packed` int32 [out, in*bits/32]
  (32 consecutive input values fill `bits` words, value j at bit j*bits: the GPTQ bit stream, so it
  is `qweight` transposed), `weight_scale` [out, groups], `weight_shape` [2], and for asymmetric
  grids `weight_zero_point` int32 [out*bits/32, groups] (packed along the output dim). Codes are
  stored signed (`q - 2**(bits-1)`), zero points too, so `(q - zero) * scale` is unchanged.
  Strategy `group` (or `channel` for group_size -1); act-order checkpoints must have static groups
  (compressed-tensors >= 0.15 has no g_idx any more; GPTQ's default `static_groups: true` is).
* `W8A8Linear` (SmoothQuant) -> `int-quantized`: `weight` int8 [out, in], `weight_scale` float32
  [out, 1] (per channel, symmetric), and `input_activations` int8 per-token dynamic in the config.
  The integer codes are recovered from the fake-quantised weight and checked exact.
* plain `nn.Linear` inside the decoder layers whose rows keep at most 2 of every 4 weights ->
  stored dense, named in `sparsity_config` (format `dense`, structure `2:4`), which vLLM reads to
  pick its 2:4 kernels.

Everything else (embeddings, norms, lm_head) is stored as in a dense folder, in the storage dtype
`gptq_layout.storage_dtype` picks, and `lm_head` is always in `ignore`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qingzhou.errors import ModelLoadError
from qingzhou.llm.quantized.gptq_layout import storage_dtype, tensors_to_store, write_checkpoint
from qingzhou.llm.quantized.pack import pack_rows
from qingzhou.llm.quantized.qlinear import QuantLinear

FORMAT_VERSION = "0.20.1"  # the compressed-tensors release whose reader the tests check this layout with


def export_compressed_tensors(model: nn.Module, tokenizer: Any, folder: str | Path) -> dict[str, Any]:
    """Write `model` into the (empty, caller-owned) `folder`; return the `quantization_config` written.

    Raises ModelLoadError when no linear is quantised or 2:4 sparse (nothing compressed-tensors
    would describe) or a layer cannot be expressed (act-order without static groups)."""
    folder = Path(folder)
    dtype = storage_dtype(model)
    state = tensors_to_store(model, dtype)
    groups: dict[tuple, list[str]] = {}  # scheme key -> module names
    formats: set[str] = set()
    sparse: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            key = _pack_quantized(name, module, state)
            formats.add("pack-quantized")
        elif type(module).__name__ == "W8A8Linear":
            key = _int_quantized(name, module, state)
            formats.add("int-quantized")
        elif isinstance(module, nn.Linear) and ".layers." in f".{name}" and is_24(module.weight):
            sparse.append(name)
            continue
        else:
            continue
        groups.setdefault(key, []).append(name)
    if not groups and not sparse:
        raise ModelLoadError("nothing to write in the compressed-tensors format: no quantised layer and no "
                             "2:4 sparse linear.", where="save_format: compressed-tensors",
                             hint="Quantise (rtn/gptq/awq with pack, or smoothquant) or prune with nm: 2:4 first.")
    linears = [n for n, m in model.named_modules() if _is_linear(m)]
    quantized = {n for names in groups.values() for n in names}
    qc = quantization_config(groups, formats, ignore=[n for n in linears if n not in quantized],
                             sparse=sparse, linears=linears, model=model)
    write_checkpoint(folder, model, tokenizer, state, dtype, qc)
    return qc


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, QuantLinear)) or type(m).__name__ == "W8A8Linear"


def is_24(weight: torch.Tensor) -> bool:
    """Every row keeps at most 2 non-zeros in each 4 consecutive input weights (and some are zero)."""
    w = weight.detach()
    if w.dim() != 2 or w.shape[1] % 4 or not w.numel():
        return False
    nz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
    return bool((nz <= 2).all())


def _pack_quantized(name: str, m: QuantLinear, state: dict[str, torch.Tensor]) -> tuple:

    gs = m.group_size if m.group_size > 0 else m.in_features
    if not torch.equal(m.g_idx.long().cpu(), torch.arange(m.in_features) // gs):
        raise ModelLoadError(f"{name}: act-order without static groups (g_idx is not in order) has no "
                             "compressed-tensors form.", where="save_format: compressed-tensors",
                             hint="Quantise with static_groups: true (GPTQ's default), or save as gptq.")
    bits, in_f, out_f = m.bits, m.in_features, m.out_features
    for k in ("qweight", "qzeros", "scales", "g_idx"):
        state.pop(f"{name}.{k}", None)
    words = -(-in_f * bits // 32)
    state[f"{name}.weight_packed"] = m.gptq_qweight().detach().cpu()[:words].T.contiguous()
    state[f"{name}.weight_scale"] = m.scales.detach().cpu().T.contiguous()  # fp16, as the grid chose it
    state[f"{name}.weight_shape"] = torch.tensor([out_f, in_f])
    zeros = m.zero_points().cpu()  # [groups, out], in [0, 2**bits)
    sym = bool((zeros == 2 ** (bits - 1)).all())
    if not sym:
        state[f"{name}.weight_zero_point"] = pack_rows(zeros.T.contiguous(), bits)[: -(-out_f * bits // 32)]
    if m.bias is not None:
        state[f"{name}.bias"] = m.bias.detach().cpu()
    return ("pack-quantized", bits, m.group_size if m.group_size > 0 and gs < in_f else -1, sym, None)


def _int_quantized(name: str, m: nn.Module, state: dict[str, torch.Tensor]) -> tuple:
    """int8 codes and the per-channel scale of a SmoothQuant layer's weight (on the symmetric int8
    grid, zero 128): scale = max|w| / 127 or / 128, whichever makes every weight an exact multiple."""
    w = m.weight.detach().float().cpu()
    amax = w.abs().amax(1, keepdim=True)
    codes = scale = None
    for top in (127.0, 128.0):
        s = torch.where(amax > 0, amax / top, torch.ones_like(amax)).half().float()
        q = torch.round(w / s)
        ok = ((q * s == w) & (q.abs() <= 128)).all(1, keepdim=True)
        codes = torch.where(ok, q, codes) if codes is not None else torch.where(ok, q, torch.nan)
        scale = torch.where(ok, s, scale) if scale is not None else torch.where(ok, s, torch.nan)
    if torch.isnan(codes).any() or codes.max() > 127:
        raise ModelLoadError(f"{name}: weight is not on a symmetric per-channel int8 grid.",
                             where="save_format: compressed-tensors")
    state[f"{name}.weight"] = codes.to(torch.int8)
    state[f"{name}.weight_scale"] = scale.contiguous()
    if m.bias is not None:
        state[f"{name}.bias"] = m.bias.detach().cpu()
    return ("int-quantized", 8, -1, True, bool(getattr(m, "quantize_activations", True)))


def _scheme(key: tuple, targets: list[str]) -> dict[str, Any]:
    fmt, bits, group_size, sym, act = key
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "group" if group_size > 0 else "channel",
               "group_size": group_size if group_size > 0 else None}
    inputs = None
    if act:  # per-token dynamic int8 activations (W8A8)
        inputs = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
                  "group_size": None}
    return {"targets": targets, "weights": weights, "input_activations": inputs,
            "output_activations": None, "format": fmt}


def quantization_config(groups: dict[tuple, list[str]], formats: set[str], *, ignore: list[str],
                        sparse: list[str], linears: list[str], model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` block vLLM's compressed-tensors loader and transformers read.

    One config group per distinct scheme. A single scheme covering every quantised linear targets
    the class `Linear` with everything else in `ignore`; several schemes target exact module names
    (`re:^name$`), so no module matches two groups."""
    from qingzhou._version import __version__

    single = len(groups) == 1
    config_groups = {
        f"group_{i}": _scheme(key, ["Linear"] if single else [f"re:^{re.escape(n)}$" for n in names])
        for i, (key, names) in enumerate(groups.items())}
    if "lm_head" not in ignore and any(n == "lm_head" for n, _ in model.named_modules()):
        ignore = [*ignore, "lm_head"]
    fmt = next(iter(formats)) if len(formats) == 1 else ("mixed-precision" if formats else "dense")
    qc: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore if groups else [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": FORMAT_VERSION,
        "sparsity_config": {},
        "transform_config": {},
        "producer": {"name": "qingzhou", "version": __version__},
    }
    if sparse:
        sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in set(sparse)}
        zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules() if n in set(sparse))
        dense_ignore = [n for n in linears if n not in set(sparse)]
        qc["sparsity_config"] = {
            "format": "dense", "sparsity_structure": "2:4",
            "targets": ["Linear"], "ignore": dense_ignore,
            "global_sparsity": round(zeros / max(1, sum(sizes.values())), 6),
            "registry_requires_subclass": False,
        }
    return qc
