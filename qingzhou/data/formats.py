"""Row formats: alpaca, sharegpt, OpenAI messages (all become a list of chat messages) and plain text.

Each converter validates the fields it needs and raises `DataError` naming the row and the field,
so `skip_bad_rows` can count and skip exactly those rows.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qingzhou.data.sources import Record
from qingzhou.errors import DataError

Message = dict[str, str]
FORMATS = ("alpaca", "sharegpt", "messages", "text")

# sharegpt speaker names -> chat roles (LLaMA-Factory / FastChat conventions)
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
}


def detect_format(row: dict[str, Any]) -> str:
    """Guess the format from a row's keys (the first row decides for a whole file)."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    raise DataError(
        f"cannot tell the data format from the keys {sorted(row)}.",
        hint="Expected alpaca (instruction/input/output), sharegpt (conversations), messages, or text; "
        "or set the format explicitly.",
    )


def _field(rec: Record, name: str, kind: type | tuple[type, ...] = str, *, required: bool = True, default: Any = None) -> Any:
    value = rec.data.get(name)
    if value is None:
        if required:
            raise DataError(f"missing required field '{name}'.", where=rec.where)
        return default
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"field '{name}' must be {names}, got {type(value).__name__}.", where=rec.where)
    return value


def _from_alpaca(rec: Record, system: str | None) -> list[Message]:
    instruction = _field(rec, "instruction")
    output = _field(rec, "output")
    extra = _field(rec, "input", required=False, default="")
    sys_prompt = _field(rec, "system", required=False, default=system)
    messages: list[Message] = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
    for i, turn in enumerate(_field(rec, "history", list, required=False, default=[])):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"field 'history[{i}]' must be a [question, answer] pair of strings.", where=rec.where)
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _from_turns(rec: Record, key: str, role_key: str, text_key: str, roles: dict[str, str], system: str | None) -> list[Message]:
    turns = _field(rec, key, list)
    sys_prompt = _field(rec, "system", required=False, default=system)
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"field '{key}[{i}]' must be an object.", where=rec.where)
        for k in (role_key, text_key):
            if not isinstance(turn.get(k), str):
                raise DataError(f"missing required field '{key}[{i}].{k}'.", where=rec.where)
        role = roles.get(turn[role_key].lower())
        if role is None:
            raise DataError(
                f"field '{key}[{i}].{role_key}' has unknown speaker '{turn[role_key]}'.",
                where=rec.where,
                hint=f"Expected one of {sorted(set(roles))}.",
            )
        messages.append({"role": role, "content": turn[text_key]})
    if sys_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": sys_prompt})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"field '{key}' has no assistant turn to learn from.", where=rec.where)
    return messages


def _from_sharegpt(rec: Record, system: str | None) -> list[Message]:
    return _from_turns(rec, "conversations", "from", "value", SHAREGPT_ROLES, system)


def _from_messages(rec: Record, system: str | None) -> list[Message]:
    roles = {"user": "user", "assistant": "assistant", "system": "system"}
    return _from_turns(rec, "messages", "role", "content", roles, system)


CONVERTERS: dict[str, Callable[[Record, str | None], list[Message]]] = {
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
    "messages": _from_messages,
}


def to_messages(rec: Record, fmt: str, system: str | None = None) -> list[Message]:
    """Convert an instruction/chat row into chat messages (roles system/user/assistant)."""
    if fmt not in CONVERTERS:
        raise DataError(f"format '{fmt}' is not a chat format.", where=rec.where, hint=f"Chat formats: {', '.join(CONVERTERS)}.")
    return CONVERTERS[fmt](rec, system)


def to_text(rec: Record, field: str = "text") -> str:
    """The raw text of a pretraining row."""
    return _field(rec, field)
