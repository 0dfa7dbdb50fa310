"""Teacher top-k logits cached on disk, so distillation epochs do not rerun the teacher.

A 49k-vocabulary teacher emits 200 KB of fp32 logits per token; its top-k (k = 32-128 carries
almost all of the probability mass of an LLM's next-token distribution) in fp16 + int32 indices is
~100x smaller. The cache is computed once per (training rows, teacher, k) - `cache_key` names the
folder - and holds one entry per training *row*, not per batch: the loop reshuffles rows into new
batches every epoch, and a row's causal logits do not depend on what it is batched with (right
padding never reaches earlier positions; packed rows carry their own position resets).

Layout: `meta.json` (format, k, row index: key -> [shard, start, length]) plus safetensors shards
of concatenated per-token `values` [tokens, k] / `indices` [tokens, k], written atomically. A row is
found by a hash of its token ids (and position ids when packed), so a batch that was not in the
cached data fails loudly instead of silently distilling from the wrong targets.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qingzhou.errors import DataError

FORMAT = "qingzhou-teacher-topk-v2"
SHARD_TOKENS = 1 << 18  # tokens per shard file: 32 MB at k=64


@dataclass
class TeacherCacheInfo:
    path: str
    rows: int
    tokens: int
    k: int
    bytes: int
    hit: bool = False  # True when an existing cache was reused (no teacher forward at all)
    forwards: int = 0  # teacher forward passes spent building it
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def row_key(input_ids: Any, position_ids: Any = None) -> str:
    """Hash of one row's token ids (and its position ids, which define packed-sample boundaries)."""
    h = hashlib.sha1(torch.as_tensor(input_ids, dtype=torch.int64).cpu().contiguous().numpy().tobytes())
    if position_ids is not None:
        h.update(torch.as_tensor(position_ids, dtype=torch.int64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of a model's weights: config, every tensor's name/shape/dtype and a strided
    sample of its values (a full hash of a 7B teacher would cost a minute; fine-tuning or merging
    changes every sampled stride)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)]
            h.update(sample.to("cpu", torch.float32).numpy().tobytes() if sample.is_floating_point()
                     else sample.to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(data_fingerprint: str, teacher_fp: str, k: int, packed: bool, values_dtype: torch.dtype) -> str:
    blob = json.dumps({"format": FORMAT, "data": data_fingerprint, "teacher": teacher_fp, "k": k,
                       "packed": packed, "dtype": str(values_dtype)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def default_cache_root() -> Path:
    from qingzhou.data.cache import default_cache_dir

    return default_cache_dir().parent / "teacher"


def _as_rows(rows: Sequence[Any]) -> list[Any]:
    """Examples pass through; plain id sequences become unpacked Examples (labels = ids)."""
    from qingzhou.data.packing import Example

    return [r if isinstance(r, Example) else Example(list(map(int, r)), list(map(int, r))) for r in rows]


@torch.no_grad()
def build_teacher_cache(teacher: torch.nn.Module, rows: Sequence[Any], path: str | Path, *, k: int = 64,
                        batch_size: int = 8, pad_id: int = 0, packed: bool = False,
                        values_dtype: torch.dtype = torch.float16, progress: bool = False) -> TeacherCacheInfo:
    """Run `teacher` once over `rows` (`Example`s or id sequences) and store every position's top-k
    logits. Rows are batched by length to waste little compute on padding."""
    import time

    from safetensors.torch import save_file

    from qingzhou.data.packing import collate
    from qingzhou.io import atomic_dir, atomic_write_json
    from qingzhou.llm.modes import eval_mode
    from qingzhou.progress import progress_bar

    rows = _as_rows(rows)
    device = next(teacher.parameters()).device
    t0 = time.perf_counter()
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    index: dict[str, list[int]] = {}
    buf_v: list[torch.Tensor] = []
    buf_i: list[torch.Tensor] = []
    state = {"shard": 0, "fill": 0, "bytes": 0, "tokens": 0, "forwards": 0}

    def flush(tmp: Path) -> None:
        if not buf_v:
            return
        tensors = {"values": torch.cat(buf_v).contiguous(), "indices": torch.cat(buf_i).contiguous()}
        save_file(tensors, str(tmp / f"shard-{state['shard']:05d}.safetensors"))
        state["bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
        state["shard"] += 1
        state["fill"] = 0
        buf_v.clear()
        buf_i.clear()

    with eval_mode(teacher), atomic_dir(path, overwrite=True, what="teacher cache") as tmp, \
            progress_bar(len(order), "teacher top-k", enabled=progress) as advance:
        for start in range(0, len(order), batch_size):
            chunk = [rows[i] for i in order[start:start + batch_size]]
            batch = collate(chunk, pad_id, packed=packed)
            inputs = {key: v.to(device) for key, v in batch.items() if key != "labels"}
            logits = teacher(**inputs, use_cache=False).logits
            state["forwards"] += 1
            vals, idx = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1)
            vals, idx = vals.to(values_dtype).cpu(), idx.to(torch.int32).cpu()
            state["k"] = vals.shape[-1]  # k capped at the vocabulary size
            for b, row in enumerate(chunk):
                n = len(row)
                key = row_key(row.input_ids, row.position_ids if packed else None)
                index[key] = [state["shard"], state["fill"], n]
                buf_v.append(vals[b, :n])
                buf_i.append(idx[b, :n])
                state["fill"] += n
                state["tokens"] += n
                if state["fill"] >= SHARD_TOKENS:
                    flush(tmp)
            advance(len(chunk))
        flush(tmp)
        atomic_write_json(tmp / "meta.json", {"format": FORMAT, "k": state.get("k", k),
                                              "packed": packed, "rows": len(index), "tokens": state["tokens"],
                                              "shards": state["shard"], "index": index})
    return TeacherCacheInfo(str(path), len(index), state["tokens"], state.get("k", k), state["bytes"], hit=False,
                            forwards=state["forwards"], seconds=time.perf_counter() - t0)


class TeacherCache:
    """Read side: `cache.for_batch(batch, pad_id)` -> {"topk_values", "topk_indices"} [B, T, k],
    usable as the `teacher_outputs` of `DistillLoss`. Shards are memory-mapped lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise DataError("not a teacher cache (no meta.json).", where=str(self.path),
                            hint="Create it with build_teacher_cache(teacher, rows, path).")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise DataError(f"unknown teacher cache format {self.meta.get('format')!r}.", where=str(meta_file),
                            hint=f"Delete the folder; it is rebuilt as {FORMAT}.")
        self.index: dict[str, list[int]] = self.meta["index"]
        self.lengths = sorted({n for _, _, n in self.index.values()}, reverse=True)
        self._shards: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    def info(self) -> TeacherCacheInfo:
        size = sum(f.stat().st_size for f in self.path.glob("shard-*.safetensors"))
        return TeacherCacheInfo(str(self.path), len(self), int(self.meta["tokens"]), self.k, size, hit=True)

    def _shard(self, i: int) -> Any:
        from safetensors import safe_open

        if i not in self._shards:
            self._shards[i] = safe_open(str(self.path / f"shard-{i:05d}.safetensors"), framework="pt")
        return self._shards[i]

    def row(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [n, k], indices [n, k]) of the cached row with this `row_key`."""
        shard, start, n = self.index[key]
        f = self._shard(shard)
        return f.get_slice("values")[start:start + n], f.get_slice("indices")[start:start + n]

    def _find(self, ids: torch.Tensor, pos: torch.Tensor | None, pad_id: int) -> str | None:
        """The key of the cached row that `ids` is (a right-padded copy of): only lengths the cache
        holds and that leave nothing but padding behind are tried."""
        width = ids.shape[0]
        non_pad = (ids != pad_id).nonzero()
        shortest = int(non_pad[-1]) + 1 if len(non_pad) else 0
        for n in self.lengths:
            if shortest <= n <= width:
                key = row_key(ids[:n], pos[:n] if pos is not None else None)
                if key in self.index:
                    return key
        return None

    def for_batch(self, batch: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"].cpu()
        pos = batch.get("position_ids")
        pos = pos.cpu() if pos is not None else None
        values = torch.zeros(*ids.shape, self.k, dtype=torch.float32)
        indices = torch.zeros(*ids.shape, self.k, dtype=torch.int64)
        for b in range(ids.shape[0]):
            key = self._find(ids[b], pos[b] if pos is not None else None, pad_id)
            if key is None:
                raise DataError(f"batch row {b} is not in the teacher cache.", where=str(self.path),
                                hint="The cache was built for other training rows or packing; delete it or "
                                     "point cache_dir elsewhere so it is rebuilt.")
            v, i = self.row(key)
            values[b, :len(v)] = v.float()
            indices[b, :len(i)] = i.long()
        device = batch["input_ids"].device
        return {"topk_values": values.to(device), "topk_indices": indices.to(device)}


def open_or_build(teacher: torch.nn.Module, rows: Sequence[Any], data_fingerprint: str, *, k: int,
                  cache_dir: str | Path | None = None, batch_size: int = 8, pad_id: int = 0,
                  packed: bool = False, values_dtype: torch.dtype = torch.float16,
                  progress: bool = False) -> tuple[TeacherCache, TeacherCacheInfo]:
    """The cache for (rows, teacher, k): reused when its folder exists, built otherwise."""
    key = cache_key(data_fingerprint, teacher_fingerprint(teacher), k, packed, values_dtype)
    path = Path(cache_dir).expanduser() / key if cache_dir else default_cache_root() / key
    if (path / "meta.json").is_file():
        cache = TeacherCache(path)
        return cache, cache.info()
    info = build_teacher_cache(teacher, rows, path, k=k, batch_size=batch_size, pad_id=pad_id, packed=packed,
                               values_dtype=values_dtype, progress=progress)
    return TeacherCache(path), info
