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

`generate` itself still spends ~2 ms of Python per token around the compiled step (measured on an
H200: a 135M model and a 1B model both decoded at ~400 tok/s on that path, far from the memory
roofline, so 4-bit weights bought nothing). For plain greedy decoding `decode` therefore runs its
own loop (`FastDecode.loop`): eager prefill into a static cache, then per token only the compiled
step (transformers' own `get_compiled_call`, so the same graph and numerics as `generate`'s fast
path) and an argmax; end-of-sequence is checked every `eos_check_every` tokens, not every token,
so the CPU runs ahead of the GPU. On CUDA that step - compiled forward, argmax and bookkeeping on
fixed buffers - is captured once as a CUDA graph and replayed per token (`cuda_graph`): the
per-call cost of the compiled function (guards, CUDA-graph-tree checks over every weight) stayed
~2 ms per token without it. Sampling, logits processors, streamers and padded batches go
through `generate`.

On the CPU, `fast="auto"` decodes Llama-family models whose decoder linears are 4-bit (the CPU
int4 kernel's) through `quantized/lean_decode.py` when the call is plain greedy decoding of one
unpadded row (streaming included): the same weights and kernels without transformers' per-layer
Python, checked against the model's own forward on first use. `fast=False` is transformers'
`generate` everywhere.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from qingzhou.llm.forward_args import accepts, cache_argument
from qingzhou.llm.modes import eval_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastDecode:
    """Settings of the fast path: a static KV cache, plus `torch.compile` of the decode step.

    `mode=None` picks "reduce-overhead" (CUDA graphs) on CUDA and the default elsewhere; tests use
    `backend="eager"` to trace the graph without waiting for a C++/Triton compile. `cache_bucket`:
    the static cache length is prompt + new tokens rounded up to a multiple of it, so prompts of
    different lengths reuse one compiled graph. `loop`: plain greedy decoding runs qingzhou's own
    per-token loop around the compiled step instead of `generate`'s (module docstring);
    `cuda_graph`: on CUDA that loop captures the whole step (compiled forward + token pick) in one
    CUDA graph and replays it, so no Python runs per token.
    """

    compile: bool = True
    backend: str = "inductor"
    mode: str | None = None
    fullgraph: bool = False
    cache_bucket: int = 256
    loop: bool = True
    eos_check_every: int = 8
    cuda_graph: bool = True


FastOption = bool | Literal["auto"] | FastDecode
_FAILED = "_qingzhou_fast_failed"  # set on a model whose compiled decode failed once: stay eager
_GRAPH_FAILED = "_qingzhou_graph_failed"  # set where capturing the decode step failed: plain steps


def resolve_fast(model: Any, fast: FastOption) -> FastDecode | None:
    """The fast-path settings to use for `model`, or None for the eager path.

    "auto" means CUDA only (on CPU the compiled step is rarely worth its compile time), and never
    for a model whose fast path already failed."""
    if fast is False or getattr(model, _FAILED, None):
        return None
    if fast == "auto":
        return FastDecode() if _device_type(model) == "cuda" else None
    return fast if isinstance(fast, FastDecode) else FastDecode()


def _cache_length(settings: FastDecode, total_tokens: int) -> int:
    bucket = max(1, settings.cache_bucket)
    return -(-total_tokens // bucket) * bucket


def _compile_config(model: Any, settings: FastDecode, own_graph: bool = False) -> Any:
    """transformers' compile settings; with `own_graph` the caller captures the CUDA graph itself,
    so inductor must not add its own ("default" mode instead of "reduce-overhead")."""
    from transformers import CompileConfig

    device = _device_type(model)
    mode = settings.mode or ("default" if own_graph else "reduce-overhead" if device == "cuda" else None)
    config = CompileConfig(fullgraph=settings.fullgraph, backend=settings.backend, mode=mode)
    config._compile_all_devices = device not in ("cuda", "xpu")  # transformers compiles CPU only when asked
    return config


def fast_generate_kwargs(model: Any, settings: FastDecode, total_tokens: int) -> dict[str, Any]:
    """Extra `model.generate` arguments of the fast path (static cache and compile config)."""
    kwargs: dict[str, Any] = {"cache_implementation": "static", "max_cache_len": _cache_length(settings, total_tokens)}
    if settings.compile:
        kwargs["compile_config"] = _compile_config(model, settings)
    else:
        kwargs["disable_compile"] = True
    return kwargs


# generate() arguments the own loop reproduces; anything else (sampling, processors...) goes to generate
_LOOP_KWARGS = {"do_sample", "pad_token_id", "eos_token_id", "min_new_tokens"}
# generation-config fields that add logits processors when set (their neutral values)
_PROCESSOR_FIELDS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                     "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
                     "forced_eos_token_id": (None,), "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0),
                     "exponential_decay_length_penalty": (None,), "num_beams": (None, 1), "min_length": (None, 0),
                     "min_new_tokens": (None, 0)}


def loop_applies(model: Any, input_ids: Any, attention_mask: Any, generate_kwargs: dict[str, Any],
                 streamer: Any) -> bool:
    """Whether plain greedy decoding of unpadded prompts is asked for, which the own loop reproduces."""
    if streamer is not None or not _plain_greedy(model, generate_kwargs):
        return False
    if not hasattr(model, "get_compiled_call") or cache_argument(model) is None or hasattr(model, "get_base_model"):
        return False
    return bool(attention_mask.all())


def _plain_greedy(model: Any, generate_kwargs: dict[str, Any]) -> bool:
    """Whether the call and the model's generation config ask for plain greedy decoding (no
    sampling, no logits processors): what the own loop and the lean path reproduce."""
    if set(generate_kwargs) - _LOOP_KWARGS or generate_kwargs.get("do_sample"):
        return False
    config = getattr(model, "generation_config", None)
    if "do_sample" not in generate_kwargs and getattr(config, "do_sample", False):
        return False
    return all(getattr(config, f, None) in neutral for f, neutral in _PROCESSOR_FIELDS.items())


class _Greedy:
    """Device-side state of one greedy decode. `pick` and `step` only run tensor ops on fixed
    buffers (no host sync, no new shapes), so one decode step can be captured in a CUDA graph."""

    def __init__(self, model: Any, forward: Callable, input_ids: Any, cache: Any, arg: str, max_new_tokens: int,
                 eos_ids: Any, pad_token_id: int, min_new: int):
        import torch

        batch, length = input_ids.shape
        device = input_ids.device
        self.forward, self.cache, self.arg = forward, cache, arg
        self.mark_step = None  # set to cudagraph_mark_step_begin when inductor's own CUDA graphs run
        self.extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
        self.tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)  # tokens produced so far
        self.position = torch.tensor([length], device=device)  # cache position of `inp`
        self.inp = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.eos_ids, self.min_new = eos_ids, min_new
        self.pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
        vocab = model.config.get_text_config().vocab_size
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        if eos_ids.numel():
            self.eos_mask[eos_ids[eos_ids < vocab]] = True

    def pick(self, logits: Any) -> None:
        """Append the greedy token (end-of-sequence held back before min_new; pad after a row ends)."""
        import torch

        if self.eos_ids.numel():
            if self.min_new:
                logits = logits.masked_fill(self.eos_mask & (self.count < self.min_new), float("-inf"))
            nxt = torch.where(self.finished, self.pad, logits.argmax(-1))
            self.finished |= torch.isin(nxt, self.eos_ids)
        else:
            nxt = logits.argmax(-1)
        self.tokens.index_copy_(1, self.count, nxt[:, None])
        self.inp.copy_(nxt[:, None])
        self.count += 1

    def step(self) -> None:
        """One decode step: the (compiled) forward of `inp`, then `pick`."""
        if self.mark_step is not None:
            self.mark_step()
        out = self.forward(input_ids=self.inp, cache_position=self.position, use_cache=True,
                           **{self.arg: self.cache}, **self.extra)
        self.pick(out.logits[:, -1])
        self.position += 1


def _capture(state: _Greedy) -> Any:
    """One decode step as a CUDA graph. Capturing records without running, so state does not move."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        state.step()
    return graph


def greedy_loop(model: Any, input_ids: Any, *, max_new_tokens: int, settings: FastDecode,
                min_new_tokens: int | None = None, eos_token_id: Any = None, pad_token_id: int | None = None,
                **_: Any) -> Any:
    """Greedy decoding as `generate` does it (same tokens, same output length and padding), with
    only the compiled decode step and an argmax per token - on CUDA one graph replay (module docstring)."""
    import torch
    from transformers import StaticCache

    batch, length = input_ids.shape
    device = input_ids.device
    config = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=device, dtype=torch.long)
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = int(eos_ids[0]) if eos_ids.numel() else 0
    graphs = _use_graph(model, settings, device)
    forward = model.__call__
    if settings.compile:
        forward = model.get_compiled_call(_compile_config(model, settings, own_graph=graphs))
    cache = StaticCache(config=model.config, max_cache_len=_cache_length(settings, length + max_new_tokens))
    state = _Greedy(model, forward, input_ids, cache, cache_argument(model), max_new_tokens, eos_ids,
                    pad_token_id, min_new_tokens or 0)
    if settings.compile and device.type == "cuda" and not graphs:
        state.mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    check_every = max(1, settings.eos_check_every)
    with torch.no_grad():
        out = model(input_ids=input_ids, cache_position=torch.arange(length, device=device), use_cache=True,
                    **{state.arg: cache}, **state.extra)
        state.pick(out.logits[:, -1])
        del out
        replay = None
        for i in range(1, max_new_tokens):  # i tokens produced so far
            if eos_ids.numel() and i % check_every == 0 and bool(state.finished.all()):
                break
            if replay is None and graphs and i == 3 and max_new_tokens > 4:  # steps 1-2 warmed the compile up
                replay = _try_capture(model, state)
            if replay is not None:
                replay.replay()
            elif graphs and i < 3:
                _side_stream_step(state)
            else:
                state.step()
    produced = int(state.count)
    tokens = state.tokens
    if eos_ids.numel() and bool(state.finished.all()):  # generate stops at the step where the last row ended
        hit = torch.isin(tokens[:, :produced], eos_ids)
        first = torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(hit[:, 0], produced, dtype=torch.long))
        produced = int(first.max()) + 1
    return torch.cat([input_ids, tokens[:, :produced]], dim=1)


def _use_graph(model: Any, settings: FastDecode, device: Any) -> bool:
    return settings.cuda_graph and device.type == "cuda" and not getattr(model, _GRAPH_FAILED, None)


def _side_stream_step(state: _Greedy) -> None:
    """A warm-up step on a side stream, as CUDA graph capture wants (lazy handles, workspaces)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        state.step()
    torch.cuda.current_stream().wait_stream(stream)


def _try_capture(model: Any, state: _Greedy) -> Any:
    """The captured step, or None (warned once per model) where capture fails: the loop goes on
    with plain steps from where it is."""
    import torch

    torch.cuda.synchronize()
    try:
        return _capture(state)
    except Exception as e:  # noqa: BLE001 - any capture failure: plain steps are the reference
        log.warning("CUDA graph capture of the decode step failed (%s: %s); decoding step by step",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        setattr(model, _GRAPH_FAILED, f"{type(e).__name__}: {e}"[:500])
        return None


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
    if fast == "auto" and lean_applies(model, input_ids, attention_mask, generate_kwargs, max_new_tokens):
        out = _lean(model, input_ids, max_new_tokens, streamer, **generate_kwargs)
        if out is not None:
            return out
    settings = resolve_fast(model, fast)
    if settings is None:
        return model.generate(**call, streamer=streamer)
    try:
        if settings.loop and loop_applies(model, input_ids, attention_mask, generate_kwargs, streamer):
            out = greedy_loop(model, input_ids, max_new_tokens=max_new_tokens, settings=settings, **generate_kwargs)
            model._qingzhou_fast_ok = True
            return out
        extra = fast_generate_kwargs(model, settings, input_ids.shape[1] + max_new_tokens)
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


def lean_applies(model: Any, input_ids: Any, attention_mask: Any, generate_kwargs: dict[str, Any],
                 max_new_tokens: int) -> bool:
    """Whether `decode` takes the lean CPU path (`quantized/lean_decode.py`): one unpadded row, plain
    greedy decoding (a streamer is fine), a model that path covers."""
    from qingzhou.llm.quantized import lean_decode

    if input_ids.shape[0] != 1 or not bool(attention_mask.all()) or not _plain_greedy(model, generate_kwargs):
        return False
    return (lean_decode.why_not(model) is None
            and lean_decode.fits_window(model, input_ids.shape[1] + max_new_tokens))


def _lean(model: Any, input_ids: Any, max_new_tokens: int, streamer: Any, *, eos_token_id: Any = None,
          min_new_tokens: int | None = None, **_: Any) -> Any:  # one row: pad_token_id is never used
    from qingzhou.llm.quantized import lean_decode

    config = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return lean_decode.greedy(model, input_ids, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                              min_new_tokens=min_new_tokens or 0, streamer=streamer)


def fast_status(model: Any, fast: FastOption) -> str:
    """What `decode` will run for this model: "lean+native" (CPU 4-bit, plain greedy, one-token
    steps in the C step), "lean" (the same on torch's kernels), "eager", "static", "static+compile"
    or the failure."""
    from qingzhou.llm.quantized import lean_decode, native

    if fast == "auto" and lean_decode.why_not(model) is None:
        return "lean+native" if native.why_not(model) is None else "lean"
    if getattr(model, _FAILED, None):
        return f"eager (fast path failed: {getattr(model, _FAILED)})"
    settings = resolve_fast(model, fast)
    return "eager" if settings is None else ("static+compile" if settings.compile else "static")


def _device_type(model: Any) -> str:
    from qingzhou.llm.devices import model_device

    return model_device(model).type


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
    from qingzhou.llm.devices import model_device

    device = model_device(model)
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
