"""Chat templates and label masking.

The tokenizer's own chat template is used unless overridden (by a name below, a .jinja file or a
raw Jinja string); tokenizers without one get `plain`. Loss goes only on assistant tokens: we
render the conversation prefix by prefix, so each assistant reply is a character span of the full
rendering, and mark the tokens whose offsets start inside a span. This works for any template
(no `{% generation %}` markers needed) and is immune to tokens merging across a turn boundary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qingzhou.errors import DataError

IGNORE_INDEX = -100

TEMPLATES: dict[str, str] = {
    # A neutral template for base models whose tokenizer has none; every reply ends in EOS.
    "plain": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### User:\n' + m['content'] + '\n\n' }}"
        "{% else %}{{ '### Assistant:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def resolve_template(tokenizer: Any, override: str | None = None) -> str:
    """The Jinja chat template to use: override (name, file or Jinja text), else the tokenizer's, else `plain`."""
    if override:
        if override in TEMPLATES:
            return TEMPLATES[override]
        if "{{" in override or "{%" in override:
            return override
        path = Path(override).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        from qingzhou.errors import did_you_mean

        raise DataError(f"unknown chat template '{override}'.", where="template", hint="Give a name, a .jinja file or Jinja text. " + did_you_mean(override, TEMPLATES))
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # multiple named templates: take the default one
        own = own.get("default") or next(iter(own.values()), None)
    return own or TEMPLATES["plain"]


def render(tokenizer: Any, messages: list[dict[str, str]], template: str, add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the (start, end) character span of every assistant reply in it.

    A reply's span starts after the rendering of everything before it plus the generation prompt,
    and ends where the rendering including it ends (so the end-of-turn token is inside it).
    """
    full = render(tokenizer, messages, template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1], template)
        if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
            raise DataError(
                "the chat template renders earlier turns differently depending on later ones, so assistant "
                "tokens cannot be located.",
                where="template",
                hint="Set `template:` to a template that renders turns independently (e.g. 'chatml').",
            )
        spans.append((len(before), len(upto)))
    return full, spans


def encode_conversation(
    tokenizer: Any,
    messages: list[dict[str, str]],
    template: str,
    *,
    max_length: int | None = None,
    train_on_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation; labels are IGNORE_INDEX outside assistant replies.

    If the template does not end the last reply with the tokenizer's EOS, EOS is appended (and
    learned) so the fine-tuned model knows when to stop.
    """
    text, spans = assistant_char_spans(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for t, (start, _end) in enumerate(offsets):
            if any(s <= start < e for s, e in spans):
                labels[t] = ids[t]
    eos = tokenizer.eos_token_id
    if eos is not None and spans and eos not in _last_span_ids(ids, labels):
        ids.append(eos)
        labels.append(eos)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def _last_span_ids(ids: list[int], labels: list[int]) -> list[int]:
    """Ids of the last run of labelled tokens (the final reply)."""
    out: list[int] = []
    for i in range(len(ids) - 1, -1, -1):
        if labels[i] == IGNORE_INDEX:
            if out:
                break
            continue
        out.append(ids[i])
    return out


def encode_text(tokenizer: Any, text: str, *, add_eos: bool = True) -> list[int]:
    """Token ids of a pretraining document: BOS if the tokenizer adds one, the text, then EOS."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids
