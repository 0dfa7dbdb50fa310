"""Text generation: prompt in, text out, with the chat template applied for chat models.

Uses transformers' `generate`; streaming goes through a `TextStreamer` subclass that hands each
finished piece of text to a callback (the CLI prints it as it comes).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from qingzhou.llm.modes import eval_mode


@dataclass
class GenerationResult:
    prompt: str
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    chat: bool

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
) -> GenerationResult:
    """Generate a reply to `prompt`. temperature 0 is greedy (deterministic)."""
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
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=streamer,
            **sampling,
        )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return GenerationResult(prompt, text, int(ids.shape[1]), int(new.numel()), seconds, new.numel() / max(seconds, 1e-9), use_chat)
