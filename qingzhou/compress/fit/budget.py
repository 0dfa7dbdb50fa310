"""What `fit` is asked to meet: a file size, an average bit width, or a decode speed. Torch-free.

Exactly one kind per fit, because the solver minimises loss under one resource; "80 MB and
40 tok/s" would be a second constraint the exact knapsack does not carry. Each kind turns into the
same thing for the solver: a cost per (linear, option) and a limit on their sum
(`fit.api._cost_table`):

* `max_size`: bytes of `model.safetensors` as `save_quantized` writes it, i.e. the payload of
  every tensor (`storage.model_bytes`) plus the file's 8-byte length and its JSON header (bounded
  from above by `storage.header_bytes_bound`, so the file never exceeds the budget);
* `avg_bits`: 8 * (bytes the fitted linears' tensors take) / (their weight count), so scales,
  zeros, g_idx and bias count as the bits they cost; the rest of the model is not in it;
* `min_tok_s` on `device`: predicted batch-1 decode time per token, the measured time of every
  option's layer plus the measured rest of the model (`timing.py`), at most 1 / min_tok_s.

Sizes accept "80MB" (10^6), "75MiB" (2^20), "1.5GB", "512KiB" or a plain byte count.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from qingzhou.errors import RecipeError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
KINDS = ("max_size", "avg_bits", "min_tok_s")


def parse_size(value: Any, *, where: str = "max_size") -> int:
    """Bytes from `value`: an int, or a string like "80MB", "75MiB", "1.5GB", "123456"."""
    if isinstance(value, bool):
        raise RecipeError(f"{value!r} is not a size.", where=where, hint='Give bytes or e.g. "80MB", "75MiB".')
    if isinstance(value, (int, float)):
        n = value
    else:
        m = _SIZE.match(str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in UNITS:
            raise RecipeError(f"{value!r} is not a size.", where=where,
                              hint='Give bytes or a number with a unit: B, KB, MB, GB (powers of 1000) or '
                                   'KiB, MiB, GiB (powers of 1024), e.g. "80MB" or "75MiB".')
        n = float(m.group(1)) * UNITS[unit]
    if not math.isfinite(n) or n <= 0:
        raise RecipeError(f"size {value!r} must be positive.", where=where)
    return int(n)


@dataclass(frozen=True)
class Budget:
    """One budget: `max_size` (bytes), `avg_bits` (bits per weight) or `min_tok_s` (+ `device`)."""

    max_size: int | None = None
    avg_bits: float | None = None
    min_tok_s: float | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise RecipeError(f"fit needs exactly one budget, got {', '.join(given) or 'none'}.", where="fit budget",
                              hint="Give one of max_size (e.g. 80MB), avg_bits (e.g. 3.5) or min_tok_s "
                                   "(with device).")
        if self.max_size is not None:
            object.__setattr__(self, "max_size", parse_size(self.max_size))
        if self.avg_bits is not None and not (isinstance(self.avg_bits, (int, float)) and 1 <= self.avg_bits <= 32):
            raise RecipeError(f"avg_bits {self.avg_bits!r} must be a number between 1 and 32.", where="avg_bits",
                              hint="E.g. 3.5: scales, zeros and g_idx count towards it.")
        if self.min_tok_s is not None and not (isinstance(self.min_tok_s, (int, float)) and self.min_tok_s > 0):
            raise RecipeError(f"min_tok_s {self.min_tok_s!r} must be a positive number.", where="min_tok_s")
        if self.device is not None and self.min_tok_s is None:
            raise RecipeError("device applies only to a min_tok_s budget.", where="device",
                              hint="The size and bit budgets do not depend on a device; drop device.")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))

    def describe(self) -> str:
        if self.kind == "max_size":
            return f"max_size {self.max_size} bytes ({self.max_size / 1e6:.2f} MB)"  # type: ignore[operator]
        if self.kind == "avg_bits":
            return f"avg_bits {self.avg_bits:g}"
        return f"min_tok_s {self.min_tok_s:g} on {self.device or 'the default device'}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def parse(cls, budget: Any) -> Budget:
        """A `Budget` from a Budget, a byte count or size string ("80MB"), or a mapping
        ({"avg_bits": 3.5}, {"min_tok_s": 40, "device": "cpu"})."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, Mapping):
            unknown = set(budget) - {*KINDS, "device"}
            if unknown:
                raise RecipeError(f"unknown budget key(s) {sorted(unknown)}.", where="fit budget",
                                  hint="Valid: max_size, avg_bits, min_tok_s, device.")
            return cls(**dict(budget))
        if isinstance(budget, (int, str)) and not isinstance(budget, bool):
            return cls(max_size=parse_size(budget))
        raise RecipeError(f"{budget!r} is not a budget.", where="fit budget",
                          hint='Give Budget(max_size=...), "80MB", {"avg_bits": 3.5} or '
                               '{"min_tok_s": 40, "device": "cpu"}.')
