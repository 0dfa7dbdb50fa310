"""Greedy batch-1 decoding of Llama-family 4-bit models on the CPU, without transformers' per-layer Python.

At batch 1 on a CPU a 4-bit model's decode step is bound by per-op overhead, not by its kernels:
for SmolLM2-135M (30 layers) on this project's 2-core machine the int4 matmuls and the int8 head
take about 5 ms of a ~18 ms token through `transformers`' forward; the rest is some 300 small ops
and the Python around them (cache objects, masks, hooks, output dataclasses). This module runs the
same computation with the model's own weights and kernels - RMSNorm, q/k/v through each layer's
int4 pack, rotary embeddings from the model's own rotary module, a preallocated KV cache, SDPA,
o-proj, SiLU-gated MLP, the fast head on the last row - and nothing else.

It applies (`why_not` says why not otherwise) to Llama, Mistral and Qwen2 configurations (Qwen2's
q/k/v biases are the modules' own) whose decoder linears are `QuantLinear`s the CPU int4 kernel
takes, on the CPU, batch 1, plain greedy decoding; sliding-window models only while the whole
sequence fits their window. Its first use on a model checks the final hidden states of the prompt's
last position and of the first decoded token against the model's own forward (relative error
`_CHECK_RTOL`); on a mismatch the model is marked and decodes through `transformers` from then on.
Greedy tokens equal the transformers path's (tests/test_lean_decode.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qingzhou.llm.quantized import int4_kernel
from qingzhou.llm.quantized.qlinear import QuantLinear

log = logging.getLogger(__name__)

ARCHS = ("llama", "mistral", "qwen2")
_CHECK_RTOL = 2e-3  # measured: 0.0 on tiny Llama/Qwen2 and SmolLM2 4-bit; 7e-3 with no rotary embedding
_FAILED = "_qingzhou_lean_failed"
_CHECKED = "_qingzhou_lean_checked"


def _linear(module: QuantLinear, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The cheapest call computing `module(x)` at inference: its int4 pack (+ bias) directly."""
    pack = module.fast_kernel(torch.device("cpu"), dtype)
    if pack is None:
        return module
    if module.compact_when_packed:
        module._compact()  # what its first forward would do
    bias = module.bias
    if bias is None:
        return pack
    bias = bias.to(dtype)
    return lambda x: pack(x) + bias


def why_not(model: nn.Module) -> str | None:
    """None if `model` decodes through this module, else the reason."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in ARCHS:
        return f"architecture {getattr(cfg, 'model_type', None)!r} (lean decoding covers {', '.join(ARCHS)})"
    if getattr(model, _FAILED, None):
        return f"its hidden states disagreed with the model's own forward ({getattr(model, _FAILED)})"
    if hasattr(model, "qingzhou_offload") or hasattr(model, "get_base_model"):
        return "offloaded or adapter-wrapped model"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "norm"):
        return "no model.layers / rotary_emb / norm"
    for layer in layers:
        a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(a, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(x is None for x in linears):
            return "a decoder layer without the Llama projections"
        if not all(isinstance(x, QuantLinear) and x.qweight.device.type == "cpu" and x.kernel != "dequant"
                   and int4_kernel.why_not(x.bits, x.group_size, x.in_features, x.out_features, x.g_idx) is None
                   for x in linears):
            return "decoder linears that are not 4-bit layers of the CPU int4 kernel"
    return None


def fits_window(model: nn.Module, total_tokens: int) -> bool:
    """Whether `total_tokens` stay inside the model's sliding window (always, without one)."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if window is None or (cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False)):
        return True
    return total_tokens <= window


@dataclass
class _Layer:
    norm1: nn.Module
    norm2: nn.Module
    q: Callable
    k: Callable
    v: Callable
    o: Callable
    gate: Callable
    up: Callable
    down: Callable


class LeanDecoder:
    """The decode state of one sequence: the model's weights, a KV cache of `max_len` positions."""

    def __init__(self, model: nn.Module, max_len: int):
        cfg = model.config
        inner = model.model
        self.model, self.inner = model, inner
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        dtype = inner.embed_tokens.weight.dtype
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(_Layer(layer.input_layernorm, layer.post_attention_layernorm,
                                      *(_linear(x, dtype) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                                                     m.gate_proj, m.up_proj, m.down_proj))))
        shape = (len(self.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self.scaling = self.head_dim ** -0.5
        self.length = 0  # positions filled
        self.hidden: torch.Tensor | None = None

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] of the last of `ids` [1, T], appended at the current position."""
        t, start = ids.shape[1], self.length
        end = start + t
        x = self.inner.embed_tokens(ids)
        positions = torch.arange(start, end).unsqueeze(0)
        cos, sin = self.inner.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, T, head_dim]
        h_, kv_, d = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            h = layer.norm1(x)
            q = self._rope(layer.q(h).view(1, t, h_, d).transpose(1, 2), cos, sin)
            k = self._rope(layer.k(h).view(1, t, kv_, d).transpose(1, 2), cos, sin)
            self.keys[i, :, :, start:end] = k
            self.values[i, :, :, start:end] = layer.v(h).view(1, t, kv_, d).transpose(1, 2)
            att = F.scaled_dot_product_attention(q, self.keys[i, :, :, :end], self.values[i, :, :, :end],
                                                 is_causal=t > 1, scale=self.scaling, enable_gqa=kv_ != h_)
            x = x + layer.o(att.transpose(1, 2).reshape(1, t, h_ * d))
            h = layer.norm2(x)
            x = x + layer.down(F.silu(layer.gate(h)) * layer.up(h))
        self.length = end
        self.hidden = self.inner.norm(x[:, -1:])[0, -1]  # the final hidden state (first-use check)
        return self.model.lm_head(self.hidden)


def _check(model: nn.Module, ids: torch.Tensor, hidden: list[torch.Tensor]) -> bool:
    """First use on a model: the final hidden states of the prompt's last position and of the first
    decoded one (so the KV cache is exercised) against the model's own forward, prefill then one
    cached step as generate runs them (the int4 kernel's result depends on the row count, so a
    single forward over all the ids would differ by bf16 rounding). Hidden states, not logits: the
    head's int8 decode copy would blur the comparison."""
    from qingzhou.llm.forward_args import cache_argument

    arg = cache_argument(model)
    prompt = ids[:, : ids.shape[1] - len(hidden) + 1]
    out = model(input_ids=prompt, use_cache=True, output_hidden_states=True)
    want = [out.hidden_states[-1][0, -1]]
    if len(hidden) > 1:
        out = model(input_ids=ids[:, -1:], use_cache=True, output_hidden_states=True, **{arg: getattr(out, arg)})
        want.append(out.hidden_states[-1][0, -1])
    got, want = torch.stack(hidden).float(), torch.stack(want).float()
    err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    log.debug("lean decoding check: relative error %.3g", err)
    if err <= _CHECK_RTOL:
        setattr(model, _CHECKED, True)
        return True
    log.warning("lean decoding disagrees with the model's forward (relative error %.3g); decoding "
                "through transformers for this model", err)
    setattr(model, _FAILED, f"relative error {err:.3g}")
    return False


def greedy(model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int, eos_ids: list[int],
           min_new_tokens: int = 0, streamer: Any = None) -> torch.Tensor | None:
    """`generate`'s greedy output ids for one unpadded row, or None where the first-use check failed
    (the caller decodes through transformers then; nothing was streamed yet)."""
    if max_new_tokens <= 0:
        return input_ids
    decoder = LeanDecoder(model, input_ids.shape[1] + max_new_tokens)
    eos = sorted(set(eos_ids))
    out: list[int] = []  # tokens streamed
    pending: list[int] = []  # tokens picked, not yet streamed (the first-use check runs before any)

    def pick(logits: torch.Tensor) -> int:
        if len(out) + len(pending) < min_new_tokens and eos:  # end held back, as generate does
            logits = logits.clone()
            logits[eos] = float("-inf")
        return int(logits.argmax())

    with torch.inference_mode():
        pending.append(pick(decoder.step(input_ids)))
        if not getattr(model, _CHECKED, False):
            hidden = [decoder.hidden]
            if max_new_tokens > 1 and pending[0] not in eos:
                pending.append(pick(decoder.step(torch.tensor([[pending[0]]]))))
                hidden.append(decoder.hidden)
            checked = torch.cat([input_ids, torch.tensor([pending[:len(hidden) - 1]], dtype=input_ids.dtype)], 1)
            if not _check(model, checked, hidden):
                return None
        if streamer is not None:
            streamer.put(input_ids.cpu())
        while True:
            token = pending.pop(0)
            out.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in eos or len(out) >= max_new_tokens:
                break
            if not pending:
                pending.append(pick(decoder.step(torch.tensor([[token]]))))
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.tensor([out], dtype=input_ids.dtype)], dim=1)
