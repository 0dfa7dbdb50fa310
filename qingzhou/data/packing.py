"""Packing tokenised samples into fixed-length rows, and collating rows into batches.

A packed row carries `position_ids` that restart at 0 for every sample and no attention mask;
transformers then derives a block-diagonal causal mask from the position resets
(`masking_utils.find_packed_sequence_indices`, and the flash-attention varlen path does the same
with `DataCollatorWithFlattening`-style inputs), so attention never crosses a sample boundary and
each sample's loss equals its unpacked loss. The forward must run with `use_cache=False`:
transformers skips the packed-sequence detection when a KV cache is present. Packing removes padding, which is most of the speed
gain on short instruction data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qingzhou.data.templates import IGNORE_INDEX


@dataclass
class Example:
    """One training row: token ids, labels (IGNORE_INDEX = no loss) and per-token positions."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.position_ids:
            self.position_ids = list(range(len(self.input_ids)))

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Tokens that contribute to the loss (label at t predicts from t-1, so the first never does)."""
        return sum(1 for lab in self.labels[1:] if lab != IGNORE_INDEX)


def split_long(example: Example, seq_len: int) -> list[Example]:
    """Cut a sample into pieces of at most seq_len (continued pretraining keeps every token)."""
    return [
        Example(example.input_ids[i : i + seq_len], example.labels[i : i + seq_len])
        for i in range(0, len(example), seq_len)
    ]


def pack_examples(examples: list[Example], seq_len: int, *, truncate: bool = True) -> list[Example]:
    """Greedy first-fit-decreasing packing into rows of at most `seq_len` tokens.

    Samples longer than seq_len are truncated (SFT: the reply tail is lost, as without packing)
    or, with truncate=False, split into pieces (pretraining). The output order is deterministic.
    """
    pieces: list[Example] = []
    for ex in examples:
        if len(ex) > seq_len:
            pieces += [Example(ex.input_ids[:seq_len], ex.labels[:seq_len])] if truncate else split_long(ex, seq_len)
        elif len(ex):
            pieces.append(ex)
    order = sorted(range(len(pieces)), key=lambda i: (-len(pieces[i]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(pieces[i])
        for b, space in enumerate(free):
            if n <= space:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(seq_len - n)
    rows = []
    for b in bins:
        ids, labels, pos = [], [], []
        for i in b:
            ids += pieces[i].input_ids
            # the first token of a packed sample must not be a target of the previous sample's last token
            labels += [IGNORE_INDEX] + pieces[i].labels[1:]
            pos += list(range(len(pieces[i])))
        rows.append(Example(ids, labels, pos))
    return rows


def collate(rows: list[Example], pad_id: int, *, packed: bool, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Right-pad rows into tensors.

    Packed rows get position_ids and no attention_mask (padding continues as its own "sample" with
    IGNORE_INDEX labels); unpacked rows get an attention_mask.
    """
    import torch

    width = max(len(r) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
    if packed:
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r)
            pos[b, :n] = torch.tensor(r.position_ids)
            pos[b, n:] = torch.arange(width - n)
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n] = torch.tensor(r.input_ids)
        labels[b, :n] = torch.tensor(r.labels)
        if not packed:
            batch["attention_mask"][b, :n] = 1
    return batch
