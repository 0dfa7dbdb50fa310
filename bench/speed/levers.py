"""Lever variants for lever_ab.py (VARIANTS=levers)."""

import contextlib
from qingzhou.finetune.loop import token_loss_sum
from qingzhou.finetune.packed_attention import packed_attention
from qingzhou.finetune.fused_lora import fused_lora_linears


def _wrap(*cms):
    def fn(model, batch):
        with contextlib.ExitStack() as st:
            for cm in cms:
                st.enter_context(cm(model))
            return token_loss_sum(model, batch)

    return fn


def variants(batch, flat):
    return {
        "qz_pattn": (_wrap(packed_attention), batch),
        "qz_flora": (_wrap(fused_lora_linears), batch),
        "qz_both": (_wrap(packed_attention, fused_lora_linears), batch),
    }
