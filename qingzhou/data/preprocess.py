"""`preprocess`: from raw text to a trained tokenizer and token shards (the first half of pretraining).

clean -> drop short documents -> exact de-dup -> near de-dup (MinHash) -> hold out a validation split
-> train a byte-level BPE tokenizer (the `tokenizers` library) on the training documents -> write each
split as memory-mapped token shards (`data/token_shards.py`). The output folder holds `tokenizer/`
(loadable with `AutoTokenizer.from_pretrained`), the shards with `index.json`, and `report.json`; it
is written in a temp folder and renamed whole, so an interrupted run leaves nothing a later one trusts.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qingzhou.data.dedup import clean_text, exact_duplicates, near_duplicates
from qingzhou.data.sources import load_records
from qingzhou.data.token_shards import token_dtype, write_index, write_shards
from qingzhou.errors import DataError

EOS, PAD = "<|endoftext|>", "<|pad|>"


class PreprocessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_field: str = Field("text", description="the field holding the text in .json/.jsonl/.csv rows")
    min_chars: int = Field(200, ge=0, description="drop documents shorter than this after cleaning")
    near_dup_threshold: float | None = Field(0.8, gt=0, le=1, description="MinHash Jaccard at which a document "
                                                                           "counts as a near duplicate (None: off)")
    vocab_size: int = Field(8192, ge=300, description="BPE vocabulary size, special tokens included")
    min_frequency: int = Field(2, ge=1, description="pairs seen fewer times are not merged")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of documents held out (at least one)")
    shard_tokens: int = Field(1 << 24, gt=0, description="tokens per shard file")
    seed: int = 0


@dataclass
class PreprocessReport:
    documents: int
    dropped_short: int
    exact_duplicates: int
    near_duplicates: int
    train_documents: int
    val_documents: int
    train_tokens: int
    val_tokens: int
    vocab_size: int
    output_dir: str
    sources: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in {"sources"}}


def read_documents(sources: list[str], text_field: str) -> list[str]:
    """The raw documents of every source, in order (a .txt file holds one document per line)."""
    docs = []
    for source in sources:
        for r in load_records(source):
            text = r.data.get(text_field)
            if not isinstance(text, str):
                raise DataError(f"row has no text field '{text_field}' (fields: {sorted(r.data)}).", where=r.where,
                                hint="Set text_field to the field that holds the document text.")
            docs.append(text)
    return docs


def _is_val(doc: str, fraction: float, seed: int) -> bool:
    """A document's split depends only on its text, so adding documents never moves others."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{doc}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def split_documents(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if not fraction:
        return docs, []
    val = [d for d in docs if _is_val(d, fraction, seed)]
    if not val and len(docs) > 1:  # a tiny corpus still gets a validation document
        val = [min(docs, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).digest())]
    held = set(map(id, val))
    return [d for d in docs if id(d) not in held], val


def train_tokenizer(docs: list[str], vocab_size: int, min_frequency: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style: no unknown tokens) trained on `docs`, wrapped as a
    transformers fast tokenizer whose end-of-text token doubles as bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def preprocess(sources: str | list[str], output_dir: str | Path, cfg: PreprocessConfig | dict[str, Any] | None = None,
               *, overwrite: bool = False, progress: bool = True) -> PreprocessReport:
    """Clean, de-duplicate and split raw text, train a BPE tokenizer on it and write token shards.

    `sources`: files (.txt one document per line, .jsonl/.json/.csv rows with `text_field`),
    `builtin:<name>` or hub data sets, as everywhere else in qingzhou.
    """
    from qingzhou.io import atomic_dir, atomic_write_json
    from qingzhou.progress import progress_bar

    cfg = cfg if isinstance(cfg, PreprocessConfig) else PreprocessConfig(**(cfg or {}))
    sources = [sources] if isinstance(sources, str) else list(sources)
    with progress_bar(4, "preprocess", enabled=progress) as advance:
        raw = read_documents(sources, cfg.text_field)
        cleaned = [clean_text(d) for d in raw]
        kept = [d for d in cleaned if len(d) >= cfg.min_chars]
        exact = exact_duplicates(kept)
        unique = [d for d, dup in zip(kept, exact) if not dup]
        advance(1, f"{len(raw)} documents read")
        near = near_duplicates(unique, cfg.near_dup_threshold, seed=cfg.seed) if cfg.near_dup_threshold else [False] * len(unique)
        docs = [d for d, dup in zip(unique, near) if not dup]
        if not docs:
            raise DataError(f"no documents left after cleaning ({len(raw)} read, {len(cleaned) - len(kept)} shorter than "
                            f"min_chars={cfg.min_chars}).", where=", ".join(sources), hint="Lower min_chars or add text.")
        train, val = split_documents(docs, cfg.val_fraction, cfg.seed)
        advance(1, f"{sum(exact)} exact and {sum(near)} near duplicates removed")
        tokenizer = train_tokenizer(train, cfg.vocab_size, cfg.min_frequency)
        advance(1, f"tokenizer trained ({len(tokenizer)} tokens)")
        eos, dtype = tokenizer.eos_token_id, token_dtype(len(tokenizer))
        with atomic_dir(output_dir, overwrite=overwrite, what="preprocess") as tmp:
            tokenizer.save_pretrained(tmp / "tokenizer")
            splits = {name: write_shards(tmp, name, (tokenizer(d, add_special_tokens=False)["input_ids"] for d in part),
                                         eos_id=eos, dtype=dtype, shard_tokens=cfg.shard_tokens)
                      for name, part in (("train", train), ("val", val)) if part}
            write_index(tmp, dtype=dtype, eos_id=eos, vocab_size=len(tokenizer), splits=splits,
                        extra={"tokenizer": "tokenizer", "config": cfg.model_dump()})
            report = PreprocessReport(
                documents=len(raw), dropped_short=len(cleaned) - len(kept), exact_duplicates=sum(exact),
                near_duplicates=sum(near), train_documents=len(train), val_documents=len(val),
                train_tokens=sum(e["tokens"] for e in splits.get("train", [])),
                val_tokens=sum(e["tokens"] for e in splits.get("val", [])), vocab_size=len(tokenizer),
                output_dir=str(output_dir), sources=[str(s) for s in sources])
            atomic_write_json(tmp / "report.json", report.to_dict())
        advance(1, f"{report.train_tokens:,} train / {report.val_tokens:,} val tokens written")
    return report
