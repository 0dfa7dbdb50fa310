"""Calibration samples for compression: token sequences of a fixed length, reproducible by seed.

Sources: `builtin:calib` (a small English text set shipped in the package, so quickstarts run
offline), or a local .jsonl / .json / .txt file. Two ways to cut samples:
* `rows`   - each record is one sample, truncated to `seq_len`; records shorter than `seq_len`
             are dropped (the GPTQ/llm-compressor convention for C4-style data);
* `concat` - all records joined with blank lines, then `num_samples` random windows of `seq_len`
             tokens (the GPTQ paper's WikiText/C4 sampling); works for short texts too.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qingzhou.data.jsonl import read_jsonl
from qingzhou.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field("builtin:calib", description="builtin:<name> or a .jsonl/.json/.txt path")
    text_field: str = Field("text", description="record key holding the text (jsonl/json)")
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    mode: Literal["rows", "concat"] = "concat"
    seed: int = 0


def resolve_source(source: str) -> Path:
    """Path of a calibration source; `builtin:NAME` is one of the package's data sets."""
    if source.startswith("builtin:"):
        from qingzhou.data.sources import resolve_builtin

        return resolve_builtin(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"calibration file {source!r} does not exist.", where="calibration.source")
    return path


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """The non-empty texts of a .jsonl (one object per line), .json (list of objects) or .txt file."""
    suffix = path.suffix.lower()
    texts: list[str] = []
    if suffix == ".jsonl":
        texts = [_field(rec, text_field, f"{path}:{i}") for i, rec in read_jsonl(path)]
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DataError("expected a JSON list of records.", where=str(path))
        texts = [_field(rec, text_field, f"{path}[{i}]") for i, rec in enumerate(data)]
    elif suffix in (".txt", ".raw", ".md"):
        texts = [p for p in path.read_text(encoding="utf-8").split("\n\n")]
    else:
        raise DataError(f"unsupported calibration file type {suffix!r}.", where=str(path),
                        hint="Use .jsonl, .json or .txt.")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError("no non-empty texts found.", where=str(path))
    return texts


def _field(rec: Any, key: str, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict) or key not in rec:
        keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
        raise DataError(f"record has no {key!r} field (has: {keys}).", where=where,
                        hint="Set calibration.text_field.")
    return str(rec[key])


def load_calibration(tokenizer: Any, cfg: CalibrationConfig | None = None) -> list[torch.Tensor]:
    """Tokenised calibration samples: a list of 1-D LongTensors of exactly `cfg.seq_len` tokens."""
    cfg = cfg or CalibrationConfig()
    texts = read_texts(resolve_source(cfg.source), cfg.text_field)
    return samples_from_texts(tokenizer, texts, cfg)


def samples_from_texts(tokenizer: Any, texts: list[str], cfg: CalibrationConfig) -> list[torch.Tensor]:
    import torch

    rng = random.Random(cfg.seed)
    if cfg.mode == "rows":
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        long_enough = [x[: cfg.seq_len] for x in ids if len(x) >= cfg.seq_len]
        if not long_enough:
            raise DataError(f"no record has {cfg.seq_len} tokens.", where=f"calibration ({cfg.source})",
                            hint="Lower calibration.seq_len or use mode: concat.")
        if len(long_enough) > cfg.num_samples:
            long_enough = rng.sample(long_enough, cfg.num_samples)
        return [torch.tensor(x, dtype=torch.long) for x in long_enough]
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    if len(ids) < cfg.seq_len:
        raise DataError(f"the calibration text has {len(ids)} tokens, fewer than seq_len={cfg.seq_len}.",
                        where=f"calibration ({cfg.source})", hint="Lower calibration.seq_len.")
    out = []
    for _ in range(cfg.num_samples):
        start = rng.randint(0, len(ids) - cfg.seq_len)
        out.append(torch.tensor(ids[start : start + cfg.seq_len], dtype=torch.long))
    return out


def calibration_samples(calib: Any, cfg: CalibrationConfig | None, tokenizer: Any, *, method: str, where: str) -> list[torch.Tensor]:
    """Calibration token tensors from whatever a compression call was given: None (load `cfg`
    with the tokenizer), an [N, T] tensor, a list of token tensors, or a list of strings."""
    import torch

    if calib is None:
        if tokenizer is None:
            raise DataError(f"{method} needs calibration data.", where=where,
                            hint="Pass calib=[token tensors] or tokenizer= to load cfg.calibration.")
        return load_calibration(tokenizer, cfg)
    if isinstance(calib, torch.Tensor):
        return list(calib.reshape(-1, calib.shape[-1]).long())
    calib = list(calib)
    if calib and all(isinstance(c, str) for c in calib):
        if tokenizer is None:
            raise DataError("text calibration samples need a tokenizer.", where=where)
        return samples_from_texts(tokenizer, calib, cfg)
    if not calib or not all(isinstance(c, torch.Tensor) for c in calib):
        raise DataError("calibration must be token tensors or strings, and not empty.", where=where)
    return [c.reshape(-1).long() for c in calib]
