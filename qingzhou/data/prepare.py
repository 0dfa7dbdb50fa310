"""`prepare_data`: source rows -> validated -> tokenised with label masks (cached) -> split -> packed.

This is the single entry the training loop uses, so SFT and continued pretraining differ only in
the `format` (chat formats vs `text`).
"""
from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qingzhou.data.cache import cache_key, default_cache_dir, load_examples, save_examples
from qingzhou.data.formats import detect_format, to_messages, to_text
from qingzhou.data.packing import Example, pack_examples, split_long
from qingzhou.data.sources import Record, fingerprint_source, load_records
from qingzhou.data.templates import encode_conversation, encode_text, resolve_template
from qingzhou.errors import DataError


class DataConfig(BaseModel):
    """How to turn a data source into training rows."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field("builtin:industry-qa", description="file path, builtin:<name>, hub:<name> or a hub id")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = "auto"
    split: str = "train"
    text_field: str = "text"
    template: str | None = Field(None, description="chat template override: name (plain, chatml), .jinja file or Jinja text")
    system: str | None = Field(None, description="system prompt for rows that have none")
    max_length: int = Field(512, gt=1)
    packing: bool = False
    train_on_prompt: bool = False
    skip_bad_rows: bool = False
    max_samples: int | None = Field(None, gt=0)
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="held-out share of samples when eval_source is unset")
    eval_source: str | None = None
    eval_max_samples: int | None = Field(None, gt=0)
    seed: int = 0
    cache: bool = True
    cache_dir: str | None = None


@dataclass
class PreparedData:
    """Training and held-out rows (packed if asked) plus counts for the run report."""

    train: Sequence[Example]  # a list, or windows read lazily from token shards
    eval: list[Example]
    packed: bool
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Hash of the exact rows, so a resumed run can check it sees the same data."""
        import hashlib

        lazy = getattr(self.train, "fingerprint", None)  # memory-mapped shards name themselves
        if isinstance(lazy, str):
            return lazy
        h = hashlib.sha256()
        for ex in self.train:
            h.update(repr((ex.input_ids, ex.labels, ex.position_ids)).encode())
        return h.hexdigest()[:16]


def tokenize_records(records: list[Record], tokenizer: Any, cfg: DataConfig) -> tuple[list[Example], dict[str, int]]:
    """Validate and tokenise rows; bad rows raise DataError unless cfg.skip_bad_rows (then counted)."""
    fmt = cfg.format if cfg.format != "auto" else (detect_format(records[0].data) if records else "text")
    template = None if fmt == "text" else resolve_template(tokenizer, cfg.template)
    # pretraining documents are split, not truncated, when packing (no tokens thrown away)
    limit = None if (fmt == "text" and cfg.packing) else cfg.max_length
    examples, bad, empty, first_error = [], 0, 0, None
    for rec in records:
        try:
            if fmt == "text":
                ids = encode_text(tokenizer, to_text(rec, cfg.text_field))
                ids = ids[:limit] if limit else ids
                ex = Example(ids, list(ids))
            else:
                ids, labels = encode_conversation(
                    tokenizer, to_messages(rec, fmt, cfg.system), template,
                    max_length=limit, train_on_prompt=cfg.train_on_prompt,
                )
                ex = Example(ids, labels)
        except DataError as e:
            if not cfg.skip_bad_rows:
                if e.where is None:
                    e = DataError(e.message, where=rec.where, hint=e.hint)
                raise e from None
            bad += 1
            first_error = first_error or e.render()
            continue
        if ex.n_targets == 0:  # e.g. the prompt alone filled max_length
            empty += 1
            continue
        examples.append(ex)
    if bad:
        warnings.warn(f"skipped {bad} bad row(s) of {len(records)}; first: {first_error}", stacklevel=2)
    return examples, {"rows": len(records), "bad_rows": bad, "empty_rows": empty, "format": fmt}


def _tokenize_cached(source: Any, tokenizer: Any, cfg: DataConfig, split: str, max_samples: int | None) -> tuple[list[Example], dict[str, Any]]:
    label = str(source) if isinstance(source, (str, Path)) else "<records>"
    records = load_records(source, split=split)
    if max_samples:
        records = records[:max_samples]
    if not records:
        raise DataError("the data source has no rows.", where=label)
    settings = cfg.model_dump(include={"format", "text_field", "template", "system", "max_length", "train_on_prompt", "skip_bad_rows"})
    settings["packing_text"] = cfg.packing and cfg.format == "text"
    settings["template_text"] = resolve_template(tokenizer, cfg.template)
    key = cache_key(fingerprint_source(source, records), tokenizer, settings)
    path = Path(cfg.cache_dir).expanduser() / key if cfg.cache_dir else default_cache_dir() / key
    if cfg.cache and (hit := load_examples(path)) is not None:
        examples, meta = hit
        return examples, {**meta, "cache": "hit", "cache_path": str(path)}
    examples, meta = tokenize_records(records, tokenizer, cfg)
    if not examples:
        raise DataError("no usable rows after tokenisation (every prompt fills max_length).", where=label,
                        hint=f"Raise max_length ({cfg.max_length}); counts: {meta}.")
    if cfg.cache:
        save_examples(path, examples, meta)
    return examples, {**meta, "cache": "miss" if cfg.cache else "off", "cache_path": str(path)}


def prepare_data(cfg: DataConfig | str, tokenizer: Any, records: list[dict] | None = None) -> PreparedData:
    """Load, tokenise (or read from cache), hold out an eval split and pack.

    `records` (in-memory rows) replaces cfg.source when given.
    """
    if isinstance(cfg, str):
        cfg = DataConfig(source=cfg)
    source = records if records is not None else cfg.source
    examples, stats = _tokenize_cached(source, tokenizer, cfg, cfg.split, cfg.max_samples)
    if cfg.eval_source:
        eval_examples, _ = _tokenize_cached(cfg.eval_source, tokenizer, cfg, cfg.split, cfg.eval_max_samples)
        train_examples = examples
    else:
        order = list(range(len(examples)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = int(round(len(examples) * cfg.eval_fraction))
        if cfg.eval_fraction > 0 and len(examples) > 1:
            n_eval = max(1, n_eval)
        if cfg.eval_max_samples:
            n_eval = min(n_eval, cfg.eval_max_samples)
        held = set(order[:n_eval])
        eval_examples = [examples[i] for i in sorted(held)]
        train_examples = [ex for i, ex in enumerate(examples) if i not in held]
    # long held-out documents (text + packing) are scored in max_length windows
    eval_examples = [p for e in eval_examples for p in split_long(e, cfg.max_length)]
    if cfg.packing:
        truncate = stats.get("format") != "text"
        train_examples = pack_examples(train_examples, cfg.max_length, truncate=truncate)
    stats.update(train_samples=len(train_examples), eval_samples=len(eval_examples),
                 train_tokens=sum(len(e) for e in train_examples),
                 train_targets=sum(e.n_targets for e in train_examples))
    return PreparedData(train_examples, eval_examples, cfg.packing, stats)
