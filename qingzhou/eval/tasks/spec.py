"""The schema of a task YAML file: one pydantic model, validated before any model is loaded.

A task file says *what* to score (its `kind`), *where* the rows come from (`local` file in the
shared-data layout and/or a `hub` dataset), how a row maps onto the kind's canonical fields
(`fields`: Jinja expressions over the raw row) and how the prompt reads (`doc_to_text`,
`description`: Jinja templates over the canonical row). Canonical fields per kind:

* multiple_choice: `choices` (list of str), `gold` (int); prompt from `doc_to_text`.
* partial_choice:  `context_options` (list of str), `continuation` (str), `gold` (int) - WinoGrande.
* loglikelihood:   `continuation` (str, without delimiter); prompt from `doc_to_text` - LAMBADA.
* generate_until:  `target` (str), optional `fewshot_answer` (str); prompt from `doc_to_text`.
* rolling:         `text` (str) - corpus perplexity.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

TaskKindName = Literal["multiple_choice", "partial_choice", "loglikelihood", "generate_until", "rolling"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalSource(_Strict):
    """Rows from a file under the data folder (`{subject}` is filled in for subject suites)."""

    path: str = Field(description="jsonl, json or csv file, relative to data_dir")
    format: Literal["auto", "wikitext_articles"] = Field(
        "auto", description="auto: by suffix; wikitext_articles: a raw WikiText file cut into articles")
    fewshot_path: str | None = Field(None, description="file with few-shot examples (dev split)")
    fields: dict[str, str] = Field(default_factory=dict, description="canonical key -> Jinja expression")


class HubSource(_Strict):
    """Rows from `datasets.load_dataset(path, name, split=split)`."""

    path: str
    name: str | None = None
    split: str
    fewshot_split: str | None = None
    fields: dict[str, str] = Field(default_factory=dict)


class GenerationConfig(_Strict):
    until: list[str] = Field(default_factory=lambda: ["\n\n"])
    max_gen_toks: int = Field(256, ge=1)


class AnswerConfig(_Strict):
    """How a generation becomes an answer before exact match (lm-eval's regex filter + options)."""

    regex: str | None = None
    group_select: int = 0
    ignore: list[str] = Field(default_factory=list, description="regexes removed from both sides")
    ignore_case: bool = False


class TaskSpec(_Strict):
    task: str
    kind: TaskKindName
    doc_to_text: str = "{{query}}"
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot_sampler: Literal["random", "first_n"] = "random"
    metrics: list[str]
    headline: str
    subjects: dict[str, str] | None = Field(
        None, description="subject key -> display name ({{subject_name}} in templates)"
    )
    local: LocalSource | None = None
    hub: HubSource | None = None
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    answer: AnswerConfig = Field(default_factory=AnswerConfig)
    reference: str = Field("", description="where the prompt and scoring come from")
    _source: str = PrivateAttr("<task>")
    _lines: dict = PrivateAttr(default_factory=dict)

    def where(self, key: str) -> str:
        """`file:line: key` of a key of this task file (for error messages)."""
        from qingzhou.yamlfile import where

        return where(self._source, self._lines, tuple(key.split(".")))

    def bind_source(self, source: str, lines: dict) -> TaskSpec:
        """Remember the file this spec came from, and check every template and field expression in
        it (syntax, sandbox rules), so a broken or malicious task file fails before any model loads."""
        from qingzhou.eval.tasks.templating import check_expression, check_template

        self._source, self._lines = source, lines
        for key in ("doc_to_text", "description"):
            check_template(getattr(self, key), self.where(key))
        for name, src in (("local", self.local), ("hub", self.hub)):
            for field, expression in (src.fields if src else {}).items():
                check_expression(expression, self.where(f"{name}.fields.{field}"))
        return self

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.local is None and self.hub is None:
            raise ValueError("a task needs a `local` or a `hub` source (or both)")
        if self.headline not in self.metrics:
            raise ValueError(f"headline {self.headline!r} is not one of metrics {self.metrics}")
        from qingzhou.eval.metrics import AGGREGATIONS

        unknown = [m for m in self.metrics if m not in AGGREGATIONS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {sorted(AGGREGATIONS)}")
        return self
