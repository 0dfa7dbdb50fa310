"""The GPTQ checkpoint layout: what transformers (via gptqmodel/optimum), GPTQModel and vLLM load.

Per quantised linear `<name>`: `<name>.qweight` int32 [in*bits/32, out] (codes packed along the
input dim), `<name>.qzeros` int32 [groups, out*bits/32] (zero points packed along the output dim,
stored as `zero - 1`: the v1 "gptq" checkpoint_format), `<name>.scales` float16 [groups, out],
`<name>.g_idx` int32 [in], and `<name>.bias` if any. Everything else is saved as in a dense model,
and config.json gains `quantization_config` (see `api.quantization_config`) and names the model class
in `architectures`, as `save_pretrained` would.

Tensors that are not quantised (embeddings, norms, an untied lm_head) keep the model's dtype, fp32
for a model loaded in fp32: casting them to fp16 would shrink SmolLM2's folder from ~171 to ~115 MB
but change what `load_quantized` rebuilds (the logits of the saved model would no longer equal those
of the model in memory, which the round-trip tests hold to 1e-5). Quantise a model loaded in
float16/bfloat16 to get 16-bit tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qingzhou.llm.quantized.qlinear import QuantLinear
from qingzhou.llm.quantized.runtime import use_bf16_head
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
    with atomic_dir(folder, overwrite=overwrite, what="quantized model") as tmp:
        state = _dedupe_tied(model, model.state_dict())
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt", "quantizer": "qingzhou"})
        config = model.config.to_dict()
        # save_pretrained would set it; vLLM and transformers' pipelines pick the model class from it
        config["architectures"] = [type(model).__name__]
        config["quantization_config"] = qc
        atomic_write_json(tmp / "config.json", config)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


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
    """Rebuild a model saved by `save_quantized` (or any v1 GPTQ checkpoint of a supported arch,
    one file or sharded) with `QuantLinear` modules; bits per module come from the tensor shapes.

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
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise ModelLoadError(f"checkpoint_format {qc.get('checkpoint_format')!r} is not supported.",
                             where=str(cfg_path), hint="Only v1 'gptq' checkpoints load here.")
    model = load_big(folder, dtype=dtype, device=str(torch.device(device)), quant_layers=install_meta_layers, **big)
    if not model.qingzhou_offload["streamed_modules"]:
        for name in ("qingzhou_offload", "qingzhou_shards"):
            delattr(model, name)  # fully resident: nothing maps the shards any more
    use_bf16_head(model)  # the CPU runtime of 4-bit layers computes a resident head in bf16 too (runtime.py)
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
