"""Teacher top-k logits cached on disk, so distillation epochs do not rerun the teacher.

A 49k-vocabulary teacher emits 200 KB of fp32 logits per token; its top-k (k = 32-128 carries
almost all of the probability mass of an LLM's next-token distribution) in fp16 + int32 indices is
~100x smaller. The cache is a folder of safetensors shards (one per batch) plus `meta.json`,
written atomically; each shard remembers a hash of the input ids it was computed on, so a cache
replayed against different or reshuffled batches fails loudly instead of silently distilling
from the wrong targets.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qingzhou.errors import DataError

FORMAT = "qingzhou-teacher-topk-v1"


@dataclass
class TeacherCacheInfo:
    path: str
    batches: int
    tokens: int
    k: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ids_hash(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _input_ids(batch: Any) -> torch.Tensor:
    return batch["input_ids"] if isinstance(batch, dict) else batch


@torch.no_grad()
def cache_teacher_topk(teacher: torch.nn.Module, batches: Iterable[Any], path: str | Path, *, k: int = 64,
                       values_dtype: torch.dtype = torch.float16) -> TeacherCacheInfo:
    """Run `teacher` once over `batches` (dicts with input_ids/attention_mask, or id tensors) and
    store the top-k logits of every position."""
    from safetensors.torch import save_file

    from qingzhou.io import atomic_dir, atomic_write_json

    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    hashes, tokens, size = [], 0, 0
    with atomic_dir(path) as tmp:
        for i, batch in enumerate(batches):
            ids = _input_ids(batch)
            kwargs = {"attention_mask": batch["attention_mask"].to(device)} if isinstance(batch, dict) and \
                batch.get("attention_mask") is not None else {}
            logits = teacher(input_ids=ids.to(device), **kwargs).logits
            vals, idx = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1)
            tensors = {"values": vals.to(values_dtype).cpu().contiguous(), "indices": idx.to(torch.int32).cpu().contiguous()}
            save_file(tensors, str(tmp / f"shard-{i:06d}.safetensors"))
            hashes.append(ids_hash(ids))
            tokens += ids.numel()
            size += sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_json(tmp / "meta.json", {"format": FORMAT, "k": k, "batches": len(hashes), "tokens": tokens,
                                              "input_hashes": hashes})
    teacher.train(was_training)
    return TeacherCacheInfo(str(path), len(hashes), tokens, k, size)


class TeacherCache:
    """Read side: `cache.get(i, input_ids)` -> {"topk_values", "topk_indices"} for batch i, usable as
    `teacher_outputs` of `DistillLoss`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise DataError("not a teacher cache (no meta.json).", where=str(self.path),
                            hint="Create it with cache_teacher_topk(teacher, batches, path).")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise DataError(f"unknown teacher cache format {self.meta.get('format')!r}.", where=str(meta_file))

    def __len__(self) -> int:
        return int(self.meta["batches"])

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    def get(self, index: int, input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if not 0 <= index < len(self):
            raise DataError(f"batch {index} is not in the cache ({len(self)} batches).", where=str(self.path))
        if input_ids is not None and ids_hash(input_ids) != self.meta["input_hashes"][index]:
            raise DataError(f"batch {index} differs from the one the teacher cache was built on.",
                            where=str(self.path), hint="Replay the same batches in the same order (fixed seed, "
                                                       "no shuffling), or rebuild the cache.")
        t = load_file(str(self.path / f"shard-{index:06d}.safetensors"))
        return {"topk_values": t["values"], "topk_indices": t["indices"]}
