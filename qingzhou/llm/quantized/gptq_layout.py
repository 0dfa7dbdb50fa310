"""The GPTQ checkpoint layout: what transformers (via gptqmodel/optimum), GPTQModel and vLLM load.

Per quantised linear `<name>`: `<name>.qweight` int32 [in*bits/32, out] (codes packed along the
input dim), `<name>.qzeros` int32 [groups, out*bits/32] (zero points packed along the output dim),
`<name>.scales` float16 [groups, out], `<name>.g_idx` int32 [in], and `<name>.bias` if any.
Everything else is saved as in a dense model, and config.json gains `quantization_config` (see
`api.quantization_config`) and names the model class in `architectures`, as `save_pretrained` would.

The zero-point convention is stated in `checkpoint_format`, the key every loader reads:
* symmetric checkpoints are `gptq` (v1: qzeros store `zero - 1`), which every GPTQ runtime loads;
* checkpoints with any asymmetric layer are `gptq_v2` (qzeros store `zero`). GPTQModel refuses an
  asymmetric v1 checkpoint unless GPTQModel itself wrote it (old AutoGPTQ v1 files wrapped zero 0
  to -1), transformers hands v2 to gptqmodel, and vLLM/SGLang read `gptq_v2` natively.
In memory `QuantLinear` always holds v1 qzeros; the writer and the reader convert.

Tensors that are not quantised (embeddings, norms, an untied lm_head, biases) are stored in a
16-bit dtype, as other GPTQ checkpoints are (`storage_dtype`): SmolLM2's folder is ~115 MB instead
of 171 MB in fp32. `quantize` rounds them to that dtype's values in memory first
(`round_to_storage`), so the saved model still computes exactly what the model in memory did.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qingzhou.llm.quantized.pack import pack_qzeros, pack_rows, unpack_qzeros, unpack_rows
from qingzhou.llm.quantized.qlinear import QuantLinear
from qingzhou.llm.quantized.runtime import use_fast_head
from qingzhou.errors import ModelLoadError
from qingzhou.io import atomic_dir, atomic_write_json

WEIGHTS = "model.safetensors"
QUANT_ATTR = "qingzhou_quantization"  # model attribute holding the quantization_config to save


def save_quantized(model: nn.Module, tokenizer: Any, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` (with `QuantLinear` modules from `quantize`) as a GPTQ-layout folder, atomically
    (a non-empty `folder` only with `overwrite=True`, and only if qingzhou wrote it)."""
    qc = getattr(model, QUANT_ATTR, None)
    if qc is None or not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ModelLoadError("model has no packed quantised layers.", where=str(folder),
                             hint="Run quantize(model, cfg) with pack=True first.")
    folder = Path(folder)
    qc = {**qc, "meta": dict(qc.get("meta") or {})}
    fmt = checkpoint_format(qc)
    qc["checkpoint_format"] = fmt
    qc["meta"]["qzeros_convention"] = QZEROS_CONVENTION[fmt]
    dtype = storage_dtype(model)
    with atomic_dir(folder, overwrite=overwrite, what="quantized model") as tmp:
        state = tensors_to_store(model, dtype)
        if fmt == "gptq_v2":
            for name, m in model.named_modules():
                if isinstance(m, QuantLinear):
                    qz = m.qzeros.detach().cpu()
                    state[f"{name}.qzeros"] = qz if m.qzeros_v2 else qzeros_v1_to_v2(qz, m.bits, m.out_features)
        write_checkpoint(tmp, model, tokenizer, state, dtype, qc)
    return folder


def write_checkpoint(folder: Path, model: nn.Module, tokenizer: Any, state: dict[str, torch.Tensor],
                     dtype: torch.dtype, qc: dict[str, Any]) -> None:
    """The files of a quantised checkpoint in `folder` (a temp folder the caller renames): the
    tensors as `model.safetensors`, config.json with `quantization_config`, the generation config
    and the tokenizer. Shared by the GPTQ and compressed-tensors writers."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS),
              metadata={"format": "pt", "quantizer": "qingzhou"})
    config = config_dict(model, dtype)
    config["quantization_config"] = qc
    atomic_write_json(folder / "config.json", config)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


QZEROS_CONVENTION = {
    "gptq": "gptq v1: qzeros stores zero - 1 (symmetric: zero = 2**(bits-1))",
    "gptq_v2": "gptq v2: qzeros stores zero; asymmetric zero points lie in [1, 2**bits - 1]",
}


def checkpoint_format(qc: dict[str, Any]) -> str:
    """`gptq` (v1) when every layer is symmetric, else `gptq_v2` (see the module docstring)."""
    asym = not qc.get("sym", True) or any(
        o.get("sym") is False for p, o in (qc.get("dynamic") or {}).items() if not p.startswith("-:"))
    return "gptq_v2" if asym else "gptq"


def qzeros_v1_to_v2(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """v1 `qzeros` (zero - 1) -> v2 (zero), packed the same way."""
    zeros = unpack_qzeros(qzeros, bits, out_features)
    return pack_rows(zeros.T.contiguous(), bits).T.contiguous()


def qzeros_v2_to_v1(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """v2 `qzeros` -> v1, what `QuantLinear` holds."""
    zeros = unpack_rows(qzeros.T.contiguous(), bits, out_features).T
    return pack_qzeros(zeros, bits)


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The dtype non-quantised tensors are stored in: the model's own if it is 16-bit, else float16
    (the dtype of GPTQ scales and of most GPTQ checkpoints), or bfloat16 where a value would
    overflow float16."""
    floats = [t for k, t in model.state_dict().items() if t.is_floating_point() and not _is_scale(model, k)]
    dtypes = {t.dtype for t in floats}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float16, torch.bfloat16):
        return next(iter(dtypes))
    big = max((float(t.detach().abs().max()) for t in floats if t.numel()), default=0.0)
    return torch.float16 if big < 65504 else torch.bfloat16


def round_to_storage(model: nn.Module, skip: frozenset[str] | set[str] = frozenset()) -> torch.dtype:
    """Round the model's stored float tensors (not GPTQ scales, which are float16 already, nor the
    state-dict keys in `skip`: fake-quantised weights, which are exact on their own grid) to the
    values of `storage_dtype`, in place and keeping their dtype, so that what `save_quantized`
    writes is what the model in memory computes with. Returns that dtype."""
    dtype = storage_dtype(model)
    with torch.no_grad():
        for k, t in model.state_dict(keep_vars=True).items():
            if k in skip:
                continue
            if t.is_floating_point() and t.dtype != dtype and not _is_scale(model, k):
                t.data.copy_(t.data.to(dtype))
    return dtype


def _is_scale(model: nn.Module, key: str) -> bool:
    if not key.endswith(".scales"):
        return False
    return isinstance(model.get_submodule(key[: -len(".scales")]), QuantLinear)


def tensors_to_store(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict for a file: tied duplicates dropped, float tensors (GPTQ scales
    excepted: float16) in `dtype`, on the CPU."""
    out = {}
    for k, v in _dedupe_tied(model, model.state_dict()).items():
        v = v.detach().cpu()
        if v.is_floating_point() and not _is_scale(model, k):
            v = v.to(dtype)
        out[k] = v
    return out


def config_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """config.json as `save_pretrained` writes it: `architectures` names the class (vLLM and
    transformers' pipelines pick the model class from it) and `dtype` the stored one."""
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    return config


def _dedupe_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second name of tied tensors (lm_head.weight == embed_tokens.weight): safetensors
    refuses shared storage and loaders re-tie them from config.tie_word_embeddings."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        key = v.data_ptr() if v.numel() else id(v)
        if key in seen and v.numel():
            continue
        seen[key] = k
        out[k] = v
    return out


def load_quantized(folder: str | Path, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", **big: Any) -> nn.Module:
    """Rebuild a model saved by `save_quantized` (or any v1/v2 GPTQ checkpoint of a supported
    arch, one file or sharded) with `QuantLinear` modules; bits per module come from the tensor shapes.

    The model is built on the meta device with the packed layers in place (`bigload.meta_model`)
    and filled from the memory-mapped shards, so the dense weights are never allocated. `big`:
    `max_memory` / `device_map` / `offload_folder` of `bigload.load_big` (offloaded 4-bit layers)."""
    from qingzhou.llm.bigload import INDEX_FILE, load_big, read_config

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists() or not ((folder / WEIGHTS).exists() or (folder / INDEX_FILE).exists()):
        raise ModelLoadError("not a quantised checkpoint folder (config.json + model.safetensors).",
                             where=str(folder))
    qc = read_config(folder).get("quantization_config")
    if not qc or qc.get("quant_method") != "gptq":
        raise ModelLoadError("config.json has no GPTQ quantization_config.", where=str(cfg_path))
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in QZEROS_CONVENTION:
        raise ModelLoadError(f"checkpoint_format {fmt!r} is not supported.", where=str(cfg_path),
                             hint="GPTQ checkpoints load here in the 'gptq' (v1) and 'gptq_v2' formats.")
    model = load_big(folder, dtype=dtype, device=str(torch.device(device)), quant_layers=install_meta_layers, **big)
    for m in model.modules():  # resident v2 layers become v1, what QuantLinear holds; streamed ones keep the flag
        if isinstance(m, QuantLinear) and m.qzeros.device.type != "meta":
            if m.qzeros_v2:
                m.qzeros.copy_(qzeros_v2_to_v1(m.qzeros, m.bits, m.out_features))
                m.qzeros_v2 = False
            m.compact_when_packed = True  # resident: keep the codes once, in the kernel's pack (qlinear.py)
    if not model.qingzhou_offload["streamed_modules"]:
        for name in ("qingzhou_offload", "qingzhou_shards"):
            delattr(model, name)  # fully resident: nothing maps the shards any more
    use_fast_head(model)  # the CPU runtime of 4-bit layers computes a resident head in bf16 too (runtime.py)
    return model.eval()


def install_meta_layers(model: nn.Module, qc: dict[str, Any], index: Any) -> None:
    """Replace every linear the checkpoint holds packed (`<name>.qweight`) by a `QuantLinear` on the
    meta device, shaped from the tensor headers (`shards.ShardIndex`): no dense weight exists."""
    from accelerate import init_on_device

    if qc.get("quant_method") != "gptq":
        raise ModelLoadError(f"quant_method {qc.get('quant_method')!r} has no packed-layer loader here.",
                             where=str(index.folder))
    with init_on_device(torch.device("meta"), include_buffers=True):
        for prefix in sorted({n[: -len(".qweight")] for n in index.names if n.endswith(".qweight")}):
            _, (in_f,), _, _ = index.meta(f"{prefix}.g_idx")
            _, (rows, out_f), _, _ = index.meta(f"{prefix}.qweight")
            _, (n_groups, _), _, _ = index.meta(f"{prefix}.scales")
            bits = rows // -(-in_f // 32)  # rows = ceil(in/32) * bits
            bias = f"{prefix}.bias" in index
            layer = QuantLinear(in_f, out_f, bits, _group_size(qc, prefix), bias=bias, n_groups=n_groups)
            layer.qzeros_v2 = qc.get("checkpoint_format") == "gptq_v2"
            if bias:  # keeps the checkpoint's bias dtype
                layer.bias = torch.empty(out_f, dtype=index.meta(f"{prefix}.bias")[0], device="meta")
            model.set_submodule(prefix, layer)
    setattr(model, QUANT_ATTR, qc)


def _group_size(qc: dict[str, Any], name: str) -> int:
    """The group size of module `name`: its `+:regex` entry in GPTQModel's `dynamic` map (a
    per-module override, e.g. a group-size fallback) if one matches, else the global one."""
    import re

    for pattern, override in (qc.get("dynamic") or {}).items():
        if pattern.startswith("-:") or "group_size" not in override:  # "-:" = left unquantised
            continue
        if re.match(pattern.removeprefix("+:"), name):
            return int(override["group_size"])
    return int(qc.get("group_size", -1))
