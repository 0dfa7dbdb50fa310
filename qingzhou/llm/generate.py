"""Text generation: prompt in, text out, with the chat template applied for chat models.

Uses transformers' `generate`; streaming goes through a `TextStreamer` subclass that hands each
finished piece of text to a callback (the CLI prints it as it comes).

The fast path. Plain eager `generate` at batch 1 is bound by Python/kernel-launch overhead on a GPU
(under 10% of the memory-bandwidth roofline for a 1B model on an H100), not by the GPU. transformers
already knows the cure: a *static* KV cache gives the decode step fixed shapes, and then its
`generate` compiles that step with `torch.compile` (mode "reduce-overhead" = CUDA graphs on CUDA;
the prefill stays eager). `decode()` turns that on (`fast=True`, or `"auto"` = CUDA only), sizes the
static cache in buckets so a new prompt length does not recompile, and falls back to the eager path
- once per model, with a warning - when compilation fails (no Triton, an unsupported layer...).
Greedy output is the same tokens as eager (checked in tests/test_generate_fast.py).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from qingzhou.llm.modes import eval_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastDecode:
    """Settings of the fast path: a static KV cache, plus `torch.compile` of the decode step.

    `mode=None` picks "reduce-overhead" (CUDA graphs) on CUDA and the default elsewhere; tests use
    `backend="eager"` to trace the graph without waiting for a C++/Triton compile. `cache_bucket`:
    the static cache length is prompt + new tokens rounded up to a multiple of it, so prompts of
    different lengths reuse one compiled graph.
    """

    compile: bool = True
    backend: str = "inductor"
    mode: str | None = None
    fullgraph: bool = False
    cache_bucket: int = 256


FastOption = bool | Literal["auto"] | FastDecode
_FAILED = "_qingzhou_fast_failed"  # set on a model whose compiled decode failed once: stay eager


def resolve_fast(model: Any, fast: FastOption) -> FastDecode | None:
    """The fast-path settings to use for `model`, or None for the eager path.

    "auto" means CUDA only (on CPU the compiled step is rarely worth its compile time), and never
    for a model whose fast path already failed."""
    if fast is False or getattr(model, _FAILED, None):
        return None
    if fast == "auto":
        return FastDecode() if _device_type(model) == "cuda" else None
    return fast if isinstance(fast, FastDecode) else FastDecode()


def fast_generate_kwargs(model: Any, settings: FastDecode, total_tokens: int) -> dict[str, Any]:
    """Extra `model.generate` arguments of the fast path (static cache and compile config)."""
    bucket = max(1, settings.cache_bucket)
    kwargs: dict[str, Any] = {"cache_implementation": "static",
                              "max_cache_len": -(-total_tokens // bucket) * bucket}
    if settings.compile:
        from transformers import CompileConfig

        device = _device_type(model)
        mode = settings.mode or ("reduce-overhead" if device == "cuda" else None)
        config = CompileConfig(fullgraph=settings.fullgraph, backend=settings.backend, mode=mode)
        config._compile_all_devices = device not in ("cuda", "xpu")  # transformers compiles CPU only when asked
        kwargs["compile_config"] = config
    else:
        kwargs["disable_compile"] = True
    return kwargs


def decode(model: Any, input_ids: Any, *, max_new_tokens: int, fast: FastOption = "auto",
           attention_mask: Any = None, streamer: Any = None, **generate_kwargs: Any) -> Any:
    """`model.generate` on the fast path when chosen, else eager; returns the output ids.

    A failure on the fast path (compilation, a layer that cannot be traced) warns once, marks the
    model and repeats the call eagerly. With a streamer the fast path is first tried without it on
    two tokens, so a fallback never prints text twice.
    """
    import torch

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **generate_kwargs)
    settings = resolve_fast(model, fast)
    if settings is None:
        return model.generate(**call, streamer=streamer)
    extra = fast_generate_kwargs(model, settings, input_ids.shape[1] + max_new_tokens)
    try:
        if streamer is not None and not getattr(model, "_qingzhou_fast_ok", False):
            model.generate(**{**call, "max_new_tokens": 2, "min_new_tokens": None}, **extra)
        out = model.generate(**call, streamer=streamer, **extra)
    except Exception as e:  # noqa: BLE001 - any fast-path failure: the eager path is the reference
        log.warning("fast generation path failed (%s: %s); using eager generate for this model",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        setattr(model, _FAILED, f"{type(e).__name__}: {e}"[:500])
        return model.generate(**call, streamer=streamer)
    model._qingzhou_fast_ok = True
    return out


def fast_status(model: Any, fast: FastOption) -> str:
    """What `decode` will run for this model: "eager", "static", "static+compile" or the failure."""
    if getattr(model, _FAILED, None):
        return f"eager (fast path failed: {getattr(model, _FAILED)})"
    settings = resolve_fast(model, fast)
    return "eager" if settings is None else ("static+compile" if settings.compile else "static")


def _device_type(model: Any) -> str:
    return next(model.parameters()).device.type


@dataclass
class GenerationResult:
    prompt: str
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    chat: bool
    decode_path: str = "eager"  # "static+compile" when the fast path ran (see fast_status)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_prompt_ids(tokenizer, prompt: str, *, chat: bool | str = "auto", system: str | None = None):
    """Token ids for `prompt`; with chat on, wrapped in the tokenizer's chat template."""
    use_chat = bool(tokenizer.chat_template) if chat == "auto" else bool(chat)
    if use_chat:
        if not tokenizer.chat_template:
            from qingzhou.errors import ModelLoadError

            raise ModelLoadError("chat=True but this tokenizer has no chat template.", hint="Use chat=False (--no-chat) for a base model.")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    return ids, use_chat


def generate(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chat: bool | str = "auto",
    system: str | None = None,
    seed: int = 0,
    stream: Callable[[str], None] | None = None,
    fast: FastOption = "auto",
) -> GenerationResult:
    """Generate a reply to `prompt`. temperature 0 is greedy (deterministic).

    `fast`: the static-cache + compiled decode path (module docstring); "auto" = on CUDA only."""
    import torch
    from transformers import TextStreamer, set_seed

    ids, use_chat = build_prompt_ids(tokenizer, prompt, chat=chat, system=system)
    device = next(model.parameters()).device
    ids = ids.to(device)
    streamer = None
    if stream is not None:

        class _CallbackStreamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    stream(text)

        streamer = _CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    set_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode(), eval_mode(model):
        out = decode(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            fast=fast,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=streamer,
            **sampling,
        )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return GenerationResult(prompt, text, int(ids.shape[1]), int(new.numel()), seconds,
                            new.numel() / max(seconds, 1e-9), use_chat, fast_status(model, fast))
