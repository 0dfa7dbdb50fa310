"""Token shards: a tokenised corpus as flat memory-mapped arrays, read back as packed training windows.

`qingzhou preprocess` writes each split as one or more raw little-endian arrays (`uint16` when the
vocabulary fits, else `uint32`), every document followed by the end-of-text id, plus `index.json`
(dtype, files, token counts, sha256). Training reads them through `np.memmap`, so a corpus far
larger than memory streams from disk: only the windows of the current batch are ever read.

A window is `seq_len` consecutive tokens of one shard (documents packed back to back, the way
GPT-style pretraining packs). Its position ids restart after every end-of-text token, which the
loop's packed collation turns into attention that never crosses a document boundary.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qingzhou.data.packing import Example
from qingzhou.errors import DataError

INDEX = "index.json"
FORMAT = "qingzhou-token-shards/1"


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every id (halves the disk and page-cache bytes)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_shards(folder: Path, split: str, docs: Iterable[list[int]], *, eos_id: int, dtype: str,
                 shard_tokens: int) -> list[dict[str, Any]]:
    """Append `docs` (each followed by `eos_id`) to `<split>-NNNNN.bin` files of at most
    `shard_tokens` tokens (a document never straddles two shards unless it alone is longer);
    returns their index entries. The caller writes into a temp folder that is renamed whole."""
    import numpy as np

    entries: list[dict[str, Any]] = []
    buf: list[int] = []

    def flush() -> None:
        if not buf:
            return
        name = f"{split}-{len(entries):05d}.bin"
        arr = np.asarray(buf, dtype=np.dtype(dtype).newbyteorder("<"))
        data = arr.tobytes()
        (folder / name).write_bytes(data)
        entries.append({"file": name, "tokens": int(arr.size), "sha256": hashlib.sha256(data).hexdigest()})
        buf.clear()

    for ids in docs:
        if buf and len(buf) + len(ids) + 1 > shard_tokens:
            flush()
        buf.extend(ids)
        buf.append(eos_id)
    flush()
    return entries


def write_index(folder: Path, *, dtype: str, eos_id: int, vocab_size: int, splits: dict[str, list[dict[str, Any]]],
                extra: dict[str, Any] | None = None) -> None:
    (folder / INDEX).write_text(json.dumps({"format": FORMAT, "dtype": dtype, "eos_id": eos_id, "vocab_size": vocab_size,
                                            "splits": splits, **(extra or {})}, indent=2))


def read_index(folder: str | Path) -> dict[str, Any]:
    """The shard index, checked enough that a wrong folder fails here with a clear message."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise DataError(f"{folder} holds no token shards ({INDEX} is missing).", where=str(folder),
                        hint="Make them with `qingzhou preprocess RAW_TEXT OUT`.")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise DataError(f"{path} is not a qingzhou token-shard index (format {index.get('format')!r}, expected {FORMAT!r}).",
                        where=str(path))
    for split in index["splits"].values():
        for e in split:
            if not (Path(folder) / e["file"]).is_file():
                raise DataError(f"token shard {e['file']} listed in {path} is missing.", where=str(path),
                                hint="Run `qingzhou preprocess` again into a new folder.")
    return index


@dataclass
class PackedWindows(Sequence[Example]):
    """The non-overlapping `seq_len`-token windows of one split, read lazily from memory-mapped
    shards: a `Sequence[Example]` the training loop indexes like a list of rows."""

    folder: Path
    split: str
    seq_len: int

    def __post_init__(self) -> None:
        import numpy as np

        self.folder = Path(self.folder)
        index = read_index(self.folder)
        if self.split not in index["splits"]:
            raise DataError(f"{self.folder / INDEX} has no '{self.split}' split (it has {sorted(index['splits'])}).",
                            where=str(self.folder))
        self.eos_id = int(index["eos_id"])
        entries = index["splits"][self.split]
        self._arrays = [np.memmap(self.folder / e["file"], dtype=np.dtype(index["dtype"]).newbyteorder("<"), mode="r")
                        for e in entries]
        # window w of the split -> (shard, start); a shard's tail shorter than seq_len is not used
        self._starts: list[tuple[int, int]] = [(s, i) for s, a in enumerate(self._arrays)
                                               for i in range(0, a.size - self.seq_len + 1, self.seq_len)]
        self._hash = hashlib.sha256(json.dumps([entries, self.seq_len], sort_keys=True).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        shard, start = self._starts[i]
        ids = self._arrays[shard][start:start + self.seq_len].astype("int64").tolist()
        return Example(ids, list(ids), restart_positions(ids, self.eos_id))

    @property
    def fingerprint(self) -> str:
        """Identity of the rows without reading them: the shards' hashes and the window length."""
        return self._hash

    @property
    def tokens(self) -> int:
        return len(self) * self.seq_len


def restart_positions(ids: list[int], eos_id: int) -> list[int]:
    """Position ids that start again at 0 after each end-of-text token."""
    pos, p = [], 0
    for t in ids:
        pos.append(p)
        p = 0 if t == eos_id else p + 1
    return pos
