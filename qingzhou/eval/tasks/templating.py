"""Jinja rendering for task files: templates for prompt text, expressions for row fields.

Jinja is what lm-evaluation-harness task files use, so their prompts can be copied over verbatim.
Undefined names are errors (a typo in a task file must not silently render as an empty string).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import jinja2


def _regex_sub(text: str, pattern: str, repl: str = "") -> str:
    return re.sub(pattern, repl, text)


def wikitext_detokenize(string: str) -> str:
    """Undo WikiText's tokenisation (" @-@ " -> "-", " , " -> ", " ...): lm-eval's wikitext_detokenizer."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        string = string.replace(a, b)
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
                 ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        string = string.replace(a, b)
    return string


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["regex_sub"] = _regex_sub
    env.filters["wikitext_detokenize"] = wikitext_detokenize
    return env


@lru_cache(maxsize=512)
def _template(source: str) -> jinja2.Template:
    return _env().from_string(source)


@lru_cache(maxsize=512)
def _expression(source: str):
    return _env().compile_expression(source, undefined_to_none=False)


def render(template: str, doc: dict[str, Any]) -> str:
    """Render a Jinja template over a row (`"{{query}}\\nAnswer:"`)."""
    return _template(template).render(**doc)


def evaluate_expression(expression: str, doc: dict[str, Any]) -> Any:
    """Evaluate a Jinja expression over a row (`"choices.label.index(answerKey)"`), keeping its type."""
    value = _expression(expression)(**doc)
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    return value
