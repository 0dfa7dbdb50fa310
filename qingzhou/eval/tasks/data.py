"""Where a task's rows come from: local files in the shared-data layout, or a `datasets` hub name.

Rows are read once, mapped onto the task kind's canonical fields (the `fields` expressions of the
task file) and checked, so a malformed row fails here naming its file and line instead of producing a
silently wrong score later.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qingzhou.data.jsonl import read_jsonl
from qingzhou.errors import DataError
from qingzhou.eval.tasks.spec import TaskSpec
from qingzhou.eval.tasks.templating import evaluate_expression

DATA_DIR_ENV = "QINGZHOU_DATA_DIR"
BUILTIN_PREFIX = "builtin:"  # a task file path inside the package (tasks/builtin/data/), not data_dir
BUILTIN_DATA_DIR = Path(__file__).parent / "builtin" / "data"


@dataclass
class DocGroup:
    """The rows of one task, or of one subject of a suite, plus its few-shot pool."""

    subject: str | None
    docs: list[dict[str, Any]]
    fewshot: list[dict[str, Any]] | None  # None: draw shots from `docs` (minus the scored row)
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


def default_data_dirs() -> list[Path]:
    """Folders searched for the shared-data layout (`tasks/*.jsonl`, `cmmlu/`...), in order."""
    here = Path(__file__).resolve()
    candidates = []
    if os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]))
    candidates += [Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    candidates += [p / "shared" / "data" for p in here.parents[3:5]]  # repo's sibling ../shared
    return candidates


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The explicit `data_dir` (must exist), else the first default folder that exists, else None."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data folder {str(path)!r} does not exist.", where="data_dir")
        return path
    return next((p for p in default_data_dirs() if p.is_dir()), None)


_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def read_wikitext_articles(path: Path) -> list[dict[str, Any]]:
    """A raw WikiText file as one row per article (`page`), cut before each ` = Title = ` line.

    The same documents as the hub's `EleutherAI/wikitext_document_level` (62 in the test split);
    the page is the article's raw lines, newline-terminated.
    """
    pages: list[list[str]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if _ARTICLE_HEADING.match(line.rstrip("\n")) or not pages:
                pages.append([])
            pages[-1].append(line)
    texts = ["".join(lines) for lines in pages]
    return [{"page": t} for t in texts if t.strip()]  # the file opens with a blank line


def read_rows(path: Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json / .csv file (csv: a blank first header is the pandas index, dropped)."""
    if not path.is_file():
        raise DataError(f"file {str(path)!r} not found.")
    if fmt == "wikitext_articles":
        return read_wikitext_articles(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [row for _, row in read_jsonl(path)]
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise DataError("expected a JSON list of objects.", where=str(path))
        return data
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            row.pop("", None)
        return rows
    raise DataError(f"unsupported file type {suffix!r}.", where=str(path), hint="Use .jsonl, .json or .csv.")


def canonical_docs(spec: TaskSpec, rows: list[dict[str, Any]], fields: dict[str, str], where: str,
                   extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Apply the task file's `fields` expressions to each row and check the kind's fields."""
    docs = []
    for i, row in enumerate(rows):
        doc = dict(row)
        if extra:
            doc.update(extra)
        try:
            for key, expr in fields.items():
                doc[key] = evaluate_expression(expr, {**row, **(extra or {})})
        except Exception as e:  # noqa: BLE001 - any failure is a data problem of this row
            raise DataError(f"cannot compute field {key!r}: {e}", where=f"{where}, row {i}") from None
        _check_doc(spec, doc, f"{where}, row {i}")
        docs.append(doc)
    return docs


_REQUIRED = {
    "multiple_choice": ("choices", "gold"),
    "partial_choice": ("context_options", "continuation", "gold"),
    "loglikelihood": ("continuation",),
    "generate_until": ("target",),
    "rolling": ("text",),
}


def _check_doc(spec: TaskSpec, doc: dict[str, Any], where: str) -> None:
    missing = [k for k in _REQUIRED[spec.kind] if k not in doc]
    if missing:
        raise DataError(f"row lacks {missing} (has {sorted(doc)}).", where=where,
                        hint="Map them with `fields:` in the task file.")
    options = doc.get("choices", doc.get("context_options"))
    if options is not None:
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options) or len(options) < 2:
            raise DataError("choices must be a list of at least 2 strings.", where=where)
        gold = doc["gold"]
        if isinstance(gold, str) and gold.isdigit():
            gold = doc["gold"] = int(gold)
        if not isinstance(gold, int) or not 0 <= gold < len(options):
            raise DataError(f"gold {gold!r} is not an index into {len(options)} choices.", where=where)


def load_groups(spec: TaskSpec, data_dir: str | Path | None = None, path: str | Path | None = None,
                source: str = "auto") -> list[DocGroup]:
    """Every group of rows of a task: one group, or one per subject for suites like CMMLU.

    `source="auto"` uses the local file when it exists and the hub dataset otherwise; `path`
    replaces the task file's local path (it may contain `{subject}`).
    """
    if source not in ("auto", "local", "hub"):
        raise DataError(f"unknown source {source!r}.", hint="Use auto, local or hub.")
    subjects = list(spec.subjects) if spec.subjects else [None]
    local_paths = _local_paths(spec, data_dir, path, subjects) if spec.local and source != "hub" else None
    if local_paths is not None and all(p.is_file() for p, _ in local_paths):
        return [_local_group(spec, subject, p, fs) for subject, (p, fs) in zip(subjects, local_paths)]
    if source == "local" or spec.hub is None:
        looked = ", ".join(str(p) for p, _ in (local_paths or [])[:2]) or "(no local source in task file)"
        raise DataError(f"no local data for task {spec.task!r}: looked at {looked}.", where=spec.task,
                        hint=f"Pass data_dir= (the folder holding tasks/, cmmlu/ ...), set {DATA_DIR_ENV}, "
                             "or give the file with path=.")
    return [_hub_group(spec, subject) for subject in subjects]


def _local_paths(spec, data_dir, path, subjects) -> list[tuple[Path, Path | None]]:
    assert spec.local is not None
    pattern = str(path) if path is not None else spec.local.path
    root = None if pattern.startswith(BUILTIN_PREFIX) else resolve_data_dir(data_dir)
    out = []
    for subject in subjects:
        fill = {"subject": subject or ""}
        main = _resolve(pattern.format(**fill), root)
        fewshot = _resolve(spec.local.fewshot_path.format(**fill), root) if spec.local.fewshot_path else None
        out.append((main, fewshot))
    return out


def _resolve(pattern: str, root: Path | None) -> Path:
    """`builtin:NAME` -> the package's task data; a relative path -> under the data folder."""
    if pattern.startswith(BUILTIN_PREFIX):
        return BUILTIN_DATA_DIR / pattern[len(BUILTIN_PREFIX):]
    path = Path(pattern)
    return path if path.is_absolute() else (root or Path.cwd()) / path


def _subject_extra(spec: TaskSpec, subject: str | None) -> dict[str, Any]:
    if subject is None or spec.subjects is None:
        return {}
    return {"subject": subject, "subject_name": spec.subjects[subject]}


def _local_group(spec: TaskSpec, subject: str | None, main: Path, fewshot: Path | None) -> DocGroup:
    assert spec.local is not None
    extra = _subject_extra(spec, subject)
    docs = canonical_docs(spec, read_rows(main, spec.local.format), spec.local.fields, str(main), extra)
    shots = None
    if fewshot is not None and fewshot.is_file():
        shots = canonical_docs(spec, read_rows(fewshot), spec.local.fields, str(fewshot), extra)
    return DocGroup(subject, docs, shots, f"local:{main}")


def _hub_group(spec: TaskSpec, subject: str | None) -> DocGroup:
    """Rows from the Hugging Face hub (needs network or a warm `datasets` cache)."""
    assert spec.hub is not None
    import datasets

    hub = spec.hub
    name = hub.name.format(subject=subject or "") if hub.name else None
    extra = _subject_extra(spec, subject)
    where = f"hub:{hub.path}" + (f"/{name}" if name else "")
    try:
        rows = list(datasets.load_dataset(hub.path, name, split=hub.split))
        shot_rows = list(datasets.load_dataset(hub.path, name, split=hub.fewshot_split)) if hub.fewshot_split else None
    except Exception as e:  # noqa: BLE001 - network, missing dataset, missing split
        raise DataError(f"cannot load {where}: {e}", where=spec.task,
                        hint="Offline? Point data_dir at local files instead.") from None
    docs = canonical_docs(spec, rows, hub.fields, f"{where}:{hub.split}", extra)
    shots = canonical_docs(spec, shot_rows, hub.fields, f"{where}:{hub.fewshot_split}", extra) if shot_rows else None
    return DocGroup(subject, docs, shots, where)
