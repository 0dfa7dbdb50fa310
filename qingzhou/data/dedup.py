"""Cleaning and de-duplication of raw documents before tokenizer training (the PanGu / GPT-3 recipe).

- `clean_text`: Unicode NFKC, control characters out, runs of spaces and blank lines collapsed.
- `exact_duplicates`: the same cleaned text (case and whitespace folded) seen before.
- `near_duplicates`: MinHash over word 5-gram shingles with locality-sensitive hashing into bands
  (Broder 1997; the scheme of GPT-3's and The Pile's dedup): documents whose estimated Jaccard
  similarity with an earlier kept one reaches the threshold. Hashes are crc32 and fixed
  permutations seeded by `seed`, so a run removes the same documents on every machine.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANKS = re.compile(r"\n\s*\n\s*\n+")
_PRIME = (1 << 61) - 1


def clean_text(text: str) -> str:
    """NFKC-normalised text without control characters, with spaces and blank lines collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def exact_duplicates(docs: Sequence[str]) -> list[bool]:
    """True for each document whose case- and whitespace-folded text appeared earlier."""
    seen: set[bytes] = set()
    out = []
    for d in docs:
        key = hashlib.sha256(" ".join(d.lower().split()).encode()).digest()
        out.append(key in seen)
        seen.add(key)
    return out


def shingles(text: str, n: int = 5) -> set[int]:
    """crc32 hashes of the word n-grams of `text` (the whole text when it has fewer words)."""
    words = text.lower().split()
    grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    return {zlib.crc32(g.encode()) for g in grams}


def minhash_signatures(docs: Sequence[str], num_perm: int = 128, seed: int = 0, n: int = 5):
    """(len(docs), num_perm) MinHash signatures under permutations h(x) = (a x + b) mod (2^61 - 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
    sig = np.empty((len(docs), num_perm), dtype=np.uint64)
    for i, d in enumerate(docs):
        x = np.fromiter(shingles(d, n), dtype=np.uint64)[:, None]
        # a, x < 2^32: a*x + b < 2^64 never wraps, so the modulus is exact
        sig[i] = ((a * x + b) % np.uint64(_PRIME)).min(axis=0)
    return sig


def near_duplicates(docs: Sequence[str], threshold: float = 0.8, *, num_perm: int = 128, bands: int = 16,
                    seed: int = 0) -> list[bool]:
    """True for each document whose estimated Jaccard similarity (fraction of equal MinHash values)
    with an earlier kept document is at least `threshold`. Candidates come from LSH: documents that
    agree on all rows of at least one of `bands` bands."""
    if not docs:
        return []
    sig = minhash_signatures(docs, num_perm, seed)
    rows = num_perm // bands
    buckets: dict[tuple[int, bytes], list[int]] = {}
    out = []
    for i in range(len(docs)):
        keys = [(band, sig[i, band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
        candidates = {j for k in keys for j in buckets.get(k, ())}
        dup = any(float((sig[i] == sig[j]).mean()) >= threshold for j in candidates)
        out.append(dup)
        if not dup:  # only kept documents can make later ones duplicates
            for k in keys:
                buckets.setdefault(k, []).append(i)
    return out
