"""Packed-row attention, one layer of SmolLM2 shape: dense block mask SDPA vs per-sample causal SDPA (CPU time)."""

import torch
import time

torch.set_num_threads(1)
from qingzhou.finetune.packed_attention import packed_sdpa_forward  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
cfg._attn_implementation = "sdpa"
lens = [[180, 150, 120, 62], [200, 170, 142]]
pos = torch.stack([torch.cat([torch.arange(n) for n in l]) for l in lens])  # noqa: E741
mask = create_causal_mask(
    config=cfg, inputs_embeds=torch.zeros(2, 512, 576), attention_mask=None, cache=None, position_ids=pos
)


class Mod(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 3
    training = True


m = Mod()
q = torch.randn(2, 9, 512, 64, requires_grad=True)
k = torch.randn(2, 3, 512, 64, requires_grad=True)
v = torch.randn(2, 3, 512, 64, requires_grad=True)


def run(packed):
    if packed:
        o, _ = packed_sdpa_forward(m, q, k, v, None, scaling=0.125, position_ids=pos)
    else:
        o, _ = sdpa_attention_forward(m, q, k, v, mask, scaling=0.125)
    t1 = time.process_time()
    o.sum().backward()
    return o, time.process_time() - t1


a, _ = run(False)
b, _ = run(True)
print("diff", (a - b).abs().max().item())
for rep in range(3):  # noqa: B007
    for p in (False, True):
        t = time.process_time()
        tb = 0
        for _ in range(5):
            tb += run(p)[1]
        tt = (time.process_time() - t) / 5
        print("packed" if p else "masked", f"total {tt * 1000:.1f} ms/layer (bwd {tb / 5 * 1000:.1f})")
