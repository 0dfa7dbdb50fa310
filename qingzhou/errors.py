"""User-facing error types.

Each kind of user mistake gets its own exception carrying *where* (file, line, key, row) and
*what was expected*. The CLI prints them as one paragraph and exits 2; internal bugs still raise
normally so they keep their tracebacks.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class QingzhouError(Exception):
    """Base class for errors caused by user input, printed without a traceback by the CLI."""

    kind = "error"

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += ("" if text.rstrip().endswith((".", "?", "!", ":", ";")) else ".") + f" {self.hint}"
        return text


class RecipeError(QingzhouError):
    kind = "recipe error"


class TaskError(RecipeError):
    """A task file (eval task YAML) that cannot be used: schema, template or sandbox refusal."""

    kind = "task error"


class DataError(QingzhouError):
    kind = "data error"


class ModelLoadError(QingzhouError):
    kind = "model error"


class DeviceError(QingzhouError):
    kind = "device error"


class UsageError(QingzhouError):
    """A command-line argument that cannot work (an output folder that is a file, ...)."""

    kind = "usage error"


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate closest to `word` (for 'did you mean ...?' hints), or None."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A hint sentence naming the closest candidate and listing the valid ones."""
    candidates = sorted(candidates)
    match = closest(word, candidates)
    listing = ", ".join(candidates)
    if match:
        return f"Did you mean '{match}'? Valid: {listing}."
    return f"Valid: {listing}."
