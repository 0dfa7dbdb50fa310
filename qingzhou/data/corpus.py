"""Text corpora for perplexity: a file, a built-in corpus shipped in the package, or a hub dataset.

`builtin:corpus` is a short industry-flavoured text written for qingzhou (finance, energy, law), so
the quickstart measures perplexity without any download or the shared data folder.
"""
from __future__ import annotations

from pathlib import Path

from qingzhou.errors import DataError

def wikitext_rows_text(raw: str) -> str:
    """The text GPTQ/AWQ/SparseGPT/Wanda evaluate: `"\\n\\n".join(test["text"])` of the HF
    wikitext-2-raw split, rebuilt from the raw release file without `datasets`."""
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    rows = [line + "\n" if line.strip() else "" for line in lines]
    return "\n\n".join(rows)


def load_text(source: str, *, wikitext_join: bool | str = "auto") -> str:
    """Read a corpus as one string.

    `source`: `builtin:NAME`, a path to a text file, or `hf:DATASET[:CONFIG]:SPLIT` (joined rows of
    its `text` column; needs network or a local datasets cache). A `wiki.*.raw` file is read the
    way the quantization papers read WikiText-2 (`"\\n\\n".join(rows)`) unless wikitext_join=False.
    """
    if source.startswith("builtin:"):
        from qingzhou.data.sources import resolve_builtin

        return resolve_builtin(source.split(":", 1)[1]).read_text(encoding="utf-8")
    if source.startswith("hf:"):
        return _load_hub_text(source[3:])
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"text file not found: {path}", hint="Pass a path to a UTF-8 text file, builtin:corpus, or hf:DATASET:SPLIT.")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}).") from e
    join = path.name.startswith("wiki.") and path.suffix == ".raw" if wikitext_join == "auto" else bool(wikitext_join)
    return wikitext_rows_text(raw) if join else raw


def _load_hub_text(spec: str) -> str:
    parts = spec.split(":")
    if len(parts) == 2:
        name, config, split = parts[0], None, parts[1]
    elif len(parts) == 3:
        name, config, split = parts
    else:
        raise DataError(f"bad hub text spec 'hf:{spec}'.", hint="Expected hf:DATASET:SPLIT or hf:DATASET:CONFIG:SPLIT.")
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, ...
        raise DataError(f"could not load dataset '{name}' split '{split}': {str(e).splitlines()[0]}") from e
    if "text" not in ds.column_names:
        raise DataError(f"dataset '{name}' has no 'text' column (columns: {', '.join(ds.column_names)}).")
    return "\n\n".join(ds["text"])
