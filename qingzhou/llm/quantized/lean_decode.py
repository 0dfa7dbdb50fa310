"""Greedy batch-1 decoding of Llama-family 4-bit models on the CPU, without transformers' per-layer Python.

At batch 1 on a CPU a 4-bit model's decode step is bound by per-op overhead, not by its kernels:
for SmolLM2-135M (30 layers) on this project's 2-core machine the int4 matmuls and the int8 head
take about 5 ms of a ~18 ms token through `transformers`' forward; the rest is some 300 small ops
and the Python around them (cache objects, masks, hooks, output dataclasses). This module runs the
same computation with the model's own weights and kernels - RMSNorm (one `F.rms_norm` call in
fp32), q/k/v as one int4 matmul over their stacked packs (gate/up likewise; the layers' own packs
become views into the stacked ones, so no weight is held twice), rotary embeddings from the model's
own rotary module applied to the q and k heads at once, a preallocated KV cache, SDPA, o-proj,
SiLU-gated MLP, the fast head on the last row - and nothing else. Measured on SmolLM2 4-bit, 2
threads, quiet: 72 tok/s with separate q/k/v and gate/up calls and the modules' own norms, 78-79
with the stacked calls and `F.rms_norm` (of the ~12.7 ms token, the int4 and int8 kernels are
5-8 ms: 5.2 timed directly, 8.4 under the profiler).

It applies (`why_not` says why not otherwise) to Llama, Mistral and Qwen2 configurations (Qwen2's
q/k/v biases are the modules' own) whose decoder linears are `QuantLinear`s the CPU int4 kernel
takes, on the CPU, batch 1, plain greedy decoding; sliding-window models only while the whole
sequence fits their window. Its first use on a model checks the final hidden states of the prompt's
last position and of the first decoded token against the model's own forward (relative error
`_CHECK_RTOL`); on a mismatch the model is marked and decodes through `transformers` from then on.
Greedy tokens equal the transformers path's (tests/test_lean_decode.py).

One-token steps (everything after the prompt) go to the C step (`native.py`, one call per token,
int4 x int8 dot products: 227 tok/s against this module's 94 on SmolLM2 4-bit, same machine and
run) where it builds and takes the model; it writes into the same KV cache, and the first-use check
holds its hidden state to `native.CHECK_RTOL` (int8 activation rounding), turning only it off on a
mismatch. `LeanDecoder(..., native_ok=False)` or `QINGZHOU_NATIVE=0` keeps every step here.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qingzhou.llm.quantized import int4_kernel, native
from qingzhou.llm.quantized.int4_kernel import Int4Pack
from qingzhou.llm.quantized.qlinear import QuantLinear

log = logging.getLogger(__name__)

ARCHS = ("llama", "mistral", "qwen2")
_CHECK_RTOL = 2e-3  # measured: 0.0 on tiny Llama/Qwen2 and SmolLM2 4-bit (AVX-512 and AVX2); 7e-3 with no rotary embedding
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
    return _Biased(pack, bias.to(dtype))


@dataclass
class _Biased:
    """An int4 pack plus a bias (Qwen2's q/k/v)."""

    pack: Int4Pack
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.pack(x) + self.bias


def _fused(modules: list[QuantLinear], dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """One call computing `cat([m(x) for m in modules], -1)`: q/k/v (or gate/up) read the same input,
    so one int4 matmul over their stacked packs replaces three (two) and their casts.

    The CPU pack is laid out in blocks of output rows (`int4_kernel._cpu_pack_block`), so when every
    layer but the last has a whole number of blocks the stacked pack is the concatenation of the
    layers' packs, bit for bit. Each layer's own pack then becomes a view into the stacked one, so
    fusing costs no memory and the layers' own forward keeps working. Where the packs cannot be
    stacked (unknown layout, different groups or column orders) or the stacked call disagrees with
    the separate ones on a random input, the layers run one by one."""
    packs = [m.fast_kernel(torch.device("cpu"), dtype) for m in modules]
    calls = [_linear(m, dtype) for m in modules]

    def separate(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([c(x) for c in calls], dim=-1)

    first = packs[0]
    if first is None or any(
            p is None or p.block is None or p.block != first.block or p.group_size != first.group_size
            or p.compute_dtype != first.compute_dtype or p.matmul is not first.matmul or p.max_rows != first.max_rows
            or p.gemm_dtype != first.gemm_dtype
            or p.packed.shape[1:] != first.packed.shape[1:] or (p.perm is None) != (first.perm is None)
            or (p.perm is not None and not torch.equal(p.perm, first.perm)) for p in packs):
        return separate
    if any(p.out_features % p.block for p in packs[:-1]):
        return separate
    stacked = Int4Pack(torch.cat([p.packed for p in packs]), torch.cat([p.scales_and_zeros for p in packs], dim=1),
                       first.perm, first.group_size, sum(p.out_features for p in packs), first.matmul,
                       first.compute_dtype, first.max_rows, first.block, first.gemm_dtype)
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(1, first.packed.shape[1] * 2, dtype=dtype, generator=rng)
    if not torch.allclose(stacked(x), torch.cat([p(x) for p in packs], dim=-1), rtol=1e-3, atol=1e-3):
        log.debug("stacked int4 packs disagree with the separate ones; running them one by one")
        return separate
    offset = 0
    for p in packs:  # the separate packs become views: no second copy of the weights
        p.packed = stacked.packed[offset: offset + p.out_features]
        offset += p.out_features
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return stacked
    bias = torch.cat([b.to(dtype) if b is not None else torch.zeros(m.out_features, dtype=dtype)
                      for b, m in zip(biases, modules)])
    return _Biased(stacked, bias)


def _norm(module: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module(x)` for a Llama-style RMSNorm as one `F.rms_norm` call (fp32: the same formula the
    module computes in ~7 ops); the module itself otherwise."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if dtype != torch.float32 or weight is None or eps is None or not type(module).__name__.endswith("RMSNorm"):
        return module
    shape = (weight.shape[-1],)
    return lambda x: F.rms_norm(x, shape, weight, eps)


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
    norm1: Callable
    norm2: Callable
    qkv: Callable  # -> [.., (heads + 2 kv_heads) * head_dim]: q, k, v side by side
    o: Callable
    gate_up: Callable  # -> [.., 2 * intermediate]
    down: Callable


_PLAN = "_qingzhou_lean_layers"  # (dtype, packs, [_Layer]) kept on the model: stacking packs is done once


def _packs(model: nn.Module, dtype: torch.dtype) -> list[Int4Pack | None]:
    """Every decoder linear's current CPU pack (what a kept plan was built from)."""
    key = (torch.device("cpu"), dtype)
    return [lin._fast.get(key) for lin in model.modules() if isinstance(lin, QuantLinear)]


def _layers(model: nn.Module, dtype: torch.dtype) -> list[_Layer]:
    """The model's decoder layers as lean calls, built on first use and kept on the model while its
    layers keep the packs the plan was built from (new weights or scales drop them)."""
    cached = getattr(model, _PLAN, None)
    if cached is not None and cached[0] == dtype and all(a is b for a, b in zip(cached[1], _packs(model, dtype))):
        return cached[2]
    layers = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        layers.append(_Layer(_norm(layer.input_layernorm, dtype), _norm(layer.post_attention_layernorm, dtype),
                             _fused([a.q_proj, a.k_proj, a.v_proj], dtype), _linear(a.o_proj, dtype),
                             _fused([m.gate_proj, m.up_proj], dtype), _linear(m.down_proj, dtype)))
    object.__setattr__(model, _PLAN, (dtype, _packs(model, dtype), layers))  # a plain attribute, not a submodule
    return layers


class LeanDecoder:
    """The decode state of one sequence: the model's weights, a KV cache of `max_len` positions."""

    def __init__(self, model: nn.Module, max_len: int, native_ok: bool = True):
        cfg = model.config
        inner = model.model
        self.model, self.inner = model, inner
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        dtype = inner.embed_tokens.weight.dtype
        self.layers = _layers(model, dtype)
        self.intermediate = model.config.intermediate_size
        shape = (len(self.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self.scaling = self.head_dim ** -0.5
        self.length = 0  # positions filled
        self.hidden: torch.Tensor | None = None
        # rotate_half(x) = x @ rotation: a signed permutation, so the product is exact
        half = self.head_dim // 2
        rotation = torch.zeros(self.head_dim, self.head_dim, dtype=dtype)
        rotation[torch.arange(half) + half, torch.arange(half)] = -1
        rotation[torch.arange(half), torch.arange(half) + half] = 1
        self.rotation = rotation
        # one-token steps through the C step where it runs here (native.py); prefill stays on torch
        self.native = native.native_model(model) if native_ok else None
        if self.native is not None:
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(max_len).unsqueeze(0))
            self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
            if self.cos.shape != (max_len, self.head_dim):  # a partial rotary embedding: not in the C step
                self.native = None

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x [.., head_dim]: `x * cos + rotate_half(x) * sin`, rounded as the model
        rounds it. Not `torch.addcmul`: its fused multiply-add (seen on an AVX2-only CPU) differs from
        the model's product and sum in the last bit, and the int4 kernel's bf16 cast of o-proj's input
        turns that into ~1e-3 (measured on SmolLM2 4-bit, 2 threads: 2.1e-3 and 7.2e-3 relative error
        in the final hidden state with addcmul, 0.0 with this product and sum)."""
        return x * cos + (x @ self.rotation) * sin

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] of the last of `ids` [1, T], appended at the current position."""
        t, start = ids.shape[1], self.length
        end = start + t
        if t == 1 and self.native is not None:
            logits, self.hidden = self.native.step(int(ids[0, 0]), start, self.cos[start], self.sin[start],
                                                   self.keys, self.values, torch.get_num_threads())
            self.length = end
            return logits
        x = self.inner.embed_tokens(ids)
        positions = torch.arange(start, end).unsqueeze(0)
        cos, sin = self.inner.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [1, T, 1, head_dim]
        h_, kv_, d, inter = self.heads, self.kv_heads, self.head_dim, self.intermediate
        gqa = kv_ != h_
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            qkv = layer.qkv(layer.norm1(x))
            qk = self._rope(qkv[..., : (h_ + kv_) * d].view(1, t, h_ + kv_, d), cos, sin)  # q and k heads at once
            keys[:, :, start:end] = qk[:, :, h_:].transpose(1, 2)
            values[:, :, start:end] = qkv[..., (h_ + kv_) * d:].view(1, t, kv_, d).transpose(1, 2)
            att = F.scaled_dot_product_attention(qk[:, :, :h_].transpose(1, 2), keys[:, :, :end], values[:, :, :end],
                                                 is_causal=t > 1, scale=self.scaling, enable_gqa=gqa)
            x = x + layer.o(att.transpose(1, 2).reshape(1, t, h_ * d))
            gu = layer.gate_up(layer.norm2(x))
            x = x + layer.down(F.silu(gu[..., :inter]) * gu[..., inter:])
        self.length = end
        self.hidden = self.inner.norm(x[:, -1:])[0, -1]  # the final hidden state (first-use check)
        return self.model.lm_head(self.hidden)


def _check(model: nn.Module, ids: torch.Tensor, hidden: list[torch.Tensor], native_step: bool = False) -> bool:
    """First use on a model: the final hidden states of the prompt's last position and of the first
    decoded one (so the KV cache is exercised) against the model's own forward, prefill then one
    cached step as generate runs them (the int4 kernel's result depends on the row count, so a
    single forward over all the ids would differ by bf16 rounding). Hidden states, not logits: the
    head's int8 decode copy would blur the comparison. `native_step`: the decoded one came from the
    C step (native.py), held to its own tolerance; where only it disagrees, the C step is turned off
    for this model and the torch lean path stays."""
    from qingzhou.llm.forward_args import cache_argument

    arg = cache_argument(model)
    prompt = ids[:, : ids.shape[1] - len(hidden) + 1]
    out = model(input_ids=prompt, use_cache=True, output_hidden_states=True)
    want = [out.hidden_states[-1][0, -1]]
    if len(hidden) > 1:
        out = model(input_ids=ids[:, -1:], use_cache=True, output_hidden_states=True, **{arg: getattr(out, arg)})
        want.append(out.hidden_states[-1][0, -1])
    errs = [((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12)).item() for g, w in zip(hidden, want)]
    log.debug("lean decoding check: relative errors %s", ", ".join(f"{e:.3g}" for e in errs))
    native_err = errs.pop() if native_step and len(errs) > 1 else None
    if any(e > _CHECK_RTOL for e in errs):
        err = max(errs)
        log.warning("lean decoding disagrees with the model's forward (relative error %.3g); decoding "
                    "through transformers for this model", err)
        setattr(model, _FAILED, f"relative error {err:.3g}")
        return False
    if native_err is not None and not native_err <= native.CHECK_RTOL:
        native.disable(model, f"relative error {native_err:.3g} of the final hidden state")
        return False
    setattr(model, _CHECKED, True)
    if native_err is not None:
        native.mark_checked(model)
    return True


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
        if not getattr(model, _CHECKED, False) or (decoder.native is not None and not native.checked(model)):
            hidden = [decoder.hidden]
            if max_new_tokens > 1 and pending[0] not in eos:
                pending.append(pick(decoder.step(torch.tensor([[pending[0]]]))))
                hidden.append(decoder.hidden)
            checked = torch.cat([input_ids, torch.tensor([pending[:len(hidden) - 1]], dtype=input_ids.dtype)], 1)
            if not _check(model, checked, hidden, native_step=decoder.native is not None):
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
