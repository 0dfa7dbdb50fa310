"""QLoRA's base: the frozen decoder linears stored as bitsandbytes 4-bit (NF4) weights.

The swap is the bnb quantizer's own in-memory path (`compress/quantize/bnb.py`), so QLoRA works on
a model qingzhou loaded from any source (GGUF included) and quantises exactly the linears
`quantize(model, {"method": "bnb"})` would; peft's k-bit preparation then freezes the base and
keeps norms in fp32. The weights are quantised straight onto the device the training loop will run
on (`llm.devices.resolve_device`: the first accelerator, else the CPU, which needs bitsandbytes >= 0.46);
a device bitsandbytes does not run on is a `DeviceError` before any work starts.
"""
from __future__ import annotations

from typing import Any


def quantize_base_4bit(model: Any, *, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "auto") -> Any:
    from peft import prepare_model_for_kbit_training

    from qingzhou.compress.quantize.bnb import BnbConfig, quantize_in_place
    from qingzhou.llm.devices import require_bitsandbytes, resolve_device

    device = resolve_device("auto")  # where `finetune` will train
    require_bitsandbytes("QLoRA", device)
    cfg = BnbConfig(quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype)
    quantize_in_place(model, cfg, device)
    model.to(device)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
