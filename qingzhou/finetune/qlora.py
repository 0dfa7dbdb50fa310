"""QLoRA's base: the frozen linear layers stored as bitsandbytes 4-bit (NF4) weights.

We swap `nn.Linear` for `bnb.nn.Linear4bit` in a model already in memory (so QLoRA works on a
model qingzhou loaded from any source, GGUF included), then apply peft's k-bit preparation
(fp32 norms, input grads for checkpointing). bitsandbytes quantises on the move to CUDA.
"""
from __future__ import annotations

from typing import Any

from qingzhou.errors import DeviceError
from qingzhou.finetune.methods import require_bitsandbytes


def quantize_base_4bit(model: Any, *, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bfloat16") -> Any:
    import torch

    bnb = require_bitsandbytes("QLoRA")
    if not torch.cuda.is_available():
        raise DeviceError("QLoRA's 4-bit bitsandbytes kernels need a CUDA GPU.", hint="Use method 'lora' on this machine.")
    dtype = getattr(torch, compute_dtype)
    skip = {name for name, m in model.named_modules() if m is model.get_output_embeddings()}

    def swap(parent: Any, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, torch.nn.Linear) and full not in skip:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=double_quant, quant_type=quant_type)
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type=quant_type,
                                             compress_statistics=double_quant)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q.to("cuda"))
            else:
                swap(child, full)

    swap(model, "")
    model.to("cuda")
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
