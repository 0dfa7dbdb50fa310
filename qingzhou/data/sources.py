"""Where training rows come from: local JSON/JSONL/CSV/Parquet/text files, built-in sets, in-memory
lists, or a `datasets` hub name.

Every row is returned with its origin and 1-based row number so a bad row can be reported as
"file.jsonl, row 17: missing 'output'" instead of a KeyError deep inside tokenisation.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qingzhou.data.jsonl import read_jsonl
from qingzhou.errors import DataError
from qingzhou.registry import Registry

BUILTIN_DIR = Path(__file__).parent / "builtin"
# every data set shipped in the package (one registry for training data, calibration and corpora):
# instruction pairs, English calibration texts, an industry-flavoured corpus, and 12 Wikipedia
# articles (one per line; CC BY-SA, see builtin/wiki_demo.NOTICE) for pretraining from scratch
BUILTIN: Registry[str] = Registry("built-in data set", error=DataError)
for _name, _file in {"industry-qa": "industry_qa.jsonl", "calib": "calib.jsonl", "corpus": "corpus.txt",
                     "wiki-demo": "wiki_demo.txt"}.items():
    BUILTIN.add(_name, _file)
LOCAL_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".txt", ".text", ".md"}


@dataclass(frozen=True)
class Record:
    """One source row plus where it came from (for error messages)."""

    data: dict[str, Any]
    origin: str
    row: int

    @property
    def where(self) -> str:
        return f"{self.origin}, row {self.row}"


def load_records(source: str | Path | Iterable[dict[str, Any]], *, split: str = "train") -> list[Record]:
    """Read every row of `source`.

    `source` is a path (.json list or {split: list}, .jsonl, .csv, .parquet, .txt with one document
    per non-empty line), `builtin:<name>`, `hub:<name>` / a bare hub id for `datasets.load_dataset`,
    or an in-memory iterable of dicts.
    """
    if not isinstance(source, (str, Path)):
        return [Record(_as_row(r, "<records>", i), "<records>", i) for i, r in enumerate(source, 1)]
    text = str(source)
    if text.startswith("builtin:"):
        return _load_file(resolve_builtin(text[len("builtin:"):]), split)
    if text.startswith("hub:"):
        return _load_hub(text[len("hub:"):], split)
    path = Path(text).expanduser()
    if path.exists():
        return _load_file(path, split)
    from qingzhou.paths import is_hub_id

    if not is_hub_id(text.partition(":")[0]):  # a typo in a path must not become a hub request ("org/name[:config]")
        raise DataError("data file not found.", where=text,
                        hint="Check the path (relative paths are from the working directory); "
                             "a hub data set is 'org/name' or 'hub:name'.")
    return _load_hub(text, split)


def resolve_builtin(name: str) -> Path:
    return BUILTIN_DIR / BUILTIN.get(name, where=f"builtin:{name}").obj


def _as_row(row: Any, origin: str, i: int) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object per row, got {type(row).__name__}.", where=f"{origin}, row {i}")
    return row


def _load_file(path: Path, split: str) -> list[Record]:
    origin = str(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError("expected a data file, got a folder.", where=origin, hint="Point at one .json/.jsonl/.csv/.parquet/.txt file.")
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix == ".json":
        return _load_json(path, split)
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return [Record(dict(r), origin, i) for i, r in enumerate(csv.DictReader(f), 1)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [Record(r, origin, i) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    if suffix in {".txt", ".text", ".md"}:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [Record({"text": line}, origin, i) for i, line in enumerate(lines, 1) if line.strip()]
    raise DataError(f"unsupported data file type '{suffix}'.", where=origin, hint=f"Supported: {', '.join(sorted(LOCAL_SUFFIXES))}.")


def _load_jsonl(path: Path) -> list[Record]:
    return [Record(_as_row(row, str(path), i), str(path), i) for i, row in read_jsonl(path)]


def _load_json(path: Path, split: str) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg}) at line {e.lineno}.", where=str(path)) from None
    if isinstance(data, dict):
        if isinstance(data.get(split), list):
            data = data[split]
        elif isinstance(data.get("data"), list):
            data = data["data"]
        else:
            raise DataError("expected a list of rows (or an object holding one under the split name).", where=str(path))
    if not isinstance(data, list):
        raise DataError(f"expected a list of rows, got {type(data).__name__}.", where=str(path))
    return [Record(_as_row(r, str(path), i), str(path), i) for i, r in enumerate(data, 1)]


def _load_hub(name: str, split: str) -> list[Record]:
    """A Hugging Face `datasets` name, optionally `name:config`; honours HF_HUB_OFFLINE and the local cache."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DataError("loading hub data sets needs the `datasets` package.", where=name) from e
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
        raise DataError(
            f"could not load hub data set ({type(e).__name__}: {str(e).splitlines()[0][:200]}).",
            where=f"hub:{name}",
            hint="Use a local file path, or make the data set available in the local `datasets` cache when offline.",
        ) from e
    origin = f"hub:{name}[{split}]"
    return [Record(dict(r), origin, i) for i, r in enumerate(ds, 1)]


def fingerprint_source(source: str | Path | Iterable[dict[str, Any]], records: list[Record]) -> str:
    """A content hash of the rows, used as part of the tokenisation cache key.

    Hashing the parsed rows (not file metadata) means an edited file is never served stale tokens.
    """
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.data, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
