"""Jinja rendering for task files, in a sandbox: templates for prompt text, expressions for row fields.

Jinja is what lm-evaluation-harness task files use, so their prompts can be copied over verbatim.
Task files are data a user may download from anywhere, so nothing in them may run code:

* templates render in jinja2's `ImmutableSandboxedEnvironment` (no `_`-prefixed attributes such
  as `__globals__` or `__class__.__mro__`, no mutating methods, no unsafe callables), with only
  `range` and `dict` as globals (no `cycler`/`joiner`/`namespace`/`lipsum` objects to start an
  attribute walk from);
* `check_template` / `check_expression` (run when a task file is loaded, before any model) parse
  every template and refuse one that reaches for a `_`-prefixed attribute, so a malicious task
  file fails before anything renders;
* repetition (`'x' * 10**9`) and powers are bounded, so a template cannot exhaust memory.

Undefined names are errors (a typo in a task file must not silently render as an empty string).
Every Jinja failure becomes a `TaskError` naming the task file, the field and the template line.
"""
from __future__ import annotations

import re
import traceback
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from qingzhou.errors import TaskError

MAX_REPEAT = 1_000_000  # longest string/list a `*` may build
MAX_POWER_BITS = 4096  # largest integer a `**` may build


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


class _TaskSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with bounded `*` and `**` (the sandbox already caps `range`)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if (operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0
                and max(left.bit_length(), 1) * right > MAX_POWER_BITS):
            raise SecurityError(f"{left!r} ** {right!r} is too large a number")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                raise SecurityError(f"repetition would build {len(seq) * n} items (limit {MAX_REPEAT})")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = _TaskSandbox(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.globals = {"range": env.globals["range"], "dict": dict}
    env.filters["regex_sub"] = _regex_sub
    env.filters["wikitext_detokenize"] = wikitext_detokenize
    return env


def _unsafe_name(node: nodes.Node) -> str | None:
    """The `_`-prefixed attribute a node reaches for (`x.__class__`, `x['__globals__']`,
    `x|attr('__init__')`), or None."""
    if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
        return node.attr
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) \
            and node.arg.value.startswith("_"):
        return node.arg.value
    if isinstance(node, nodes.Filter) and node.name == "attr":
        for arg in node.args:
            if isinstance(arg, nodes.Const) and isinstance(arg.value, str) and arg.value.startswith("_"):
                return arg.value
    return None


def _refuse_unsafe(tree: nodes.Node, where: str) -> None:
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        name = _unsafe_name(node)
        if name is not None:
            raise TaskError(
                f"the template reaches for the private attribute '{name}' (line {node.lineno}); task templates may "
                "only read row fields, and this one is refused without rendering anything.",
                where=where, hint="Remove it: prompts need only the row's fields, filters and plain expressions.",
            )


def _line_of(e: BaseException) -> int | None:
    """The template line a Jinja error happened on (syntax errors carry it; runtime errors show
    it as a `<template>` frame in the traceback jinja rewrites)."""
    if isinstance(e, jinja2.TemplateSyntaxError):
        return e.lineno
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<template>"]
    return frames[-1].lineno if frames else None


def _task_error(e: Exception, where: str, what: str) -> TaskError:
    line = _line_of(e)
    at = f" (template line {line})" if line else ""
    if isinstance(e, jinja2.TemplateError):
        message = e.message or type(e).__name__
    else:  # a Python error inside an expression: 1/0, 'a' + 1, [].index(x) ...
        message = f"{type(e).__name__}: {e}"
    if isinstance(e, SecurityError):
        return TaskError(f"the {what} was refused by the sandbox{at}: {message}. Task templates may only read row fields.",
                         where=where)
    kind = "syntax error" if isinstance(e, jinja2.TemplateSyntaxError) else "error"
    return TaskError(f"{what} {kind}{at}: {message}.", where=where)


@lru_cache(maxsize=512)
def _template(source: str) -> jinja2.Template:
    return _env().from_string(source)


@lru_cache(maxsize=512)
def _expression(source: str):
    return _env().compile_expression(source, undefined_to_none=False)


def check_template(template: str, where: str = "task template") -> None:
    """Parse `template` and refuse private-attribute access; TaskError naming `where` and the line."""
    try:
        tree = _env().parse(template)
    except jinja2.TemplateError as e:
        raise _task_error(e, where, "template") from None
    _refuse_unsafe(tree, where)


def check_expression(expression: str, where: str = "task field") -> None:
    """As check_template, for a field expression (`choices.label.index(answerKey)`)."""
    try:
        parser = Parser(_env(), expression, state="variable")
        tree = parser.parse_expression()
        if not parser.stream.eos:
            raise jinja2.TemplateSyntaxError("unexpected text after the expression", parser.stream.current.lineno)
    except jinja2.TemplateError as e:
        raise _task_error(e, where, "expression") from None
    _refuse_unsafe(tree, where)


def render(template: str, doc: dict[str, Any], *, where: str = "task template") -> str:
    """Render a Jinja template over a row (`"{{query}}\\nAnswer:"`) in the sandbox."""
    try:
        return _template(template).render(**doc)
    except Exception as e:  # noqa: BLE001 - whatever a task file's template does wrong is the file's error
        raise _task_error(e, where, "template") from None


def evaluate_expression(expression: str, doc: dict[str, Any], *, where: str = "task field") -> Any:
    """Evaluate a Jinja expression over a row (`"choices.label.index(answerKey)"`), keeping its type."""
    try:
        value = _expression(expression)(**doc)
        if isinstance(value, jinja2.Undefined):
            value._fail_with_undefined_error()
    except Exception as e:  # noqa: BLE001 - as in render
        raise _task_error(e, where, "expression") from None
    return value
