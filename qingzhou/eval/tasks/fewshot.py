"""Few-shot prompts: which solved examples go in front of a row, and how they are joined.

Same rules as lm-evaluation-harness so that k-shot numbers are comparable: shots come from the
task's dev split when it has one, otherwise from the scored split minus the row itself; `random`
draws with one `random.Random(seed)` consumed row after row (so a run is reproducible and a row's
shots do not depend on the batch size), `first_n` takes the split's first rows (CMMLU, C-Eval).
"""
from __future__ import annotations

import random
from typing import Any

from qingzhou.errors import DataError
from qingzhou.eval.tasks.kinds import KINDS
from qingzhou.eval.tasks.spec import TaskSpec
from qingzhou.eval.tasks.templating import render


def sample_shots(pool: list[dict[str, Any]], n: int, rng: random.Random, sampler: str,
                 exclude: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`n` examples from `pool`, never the row being scored (`exclude`)."""
    if n == 0:
        return []
    available = len(pool) - (1 if exclude is not None else 0)
    if n > available:
        raise DataError(f"{n}-shot needs {n} examples but the few-shot pool has {available}.")
    if sampler == "first_n":
        return [d for d in pool if d != exclude][:n]
    if exclude is None:
        return rng.sample(pool, n)
    shots = [d for d in rng.sample(pool, n + 1) if d != exclude][:n]
    if len(shots) < n:  # duplicates of the scored row were drawn
        shots = rng.sample([d for d in pool if d != exclude], n)
    return shots


def build_prefix(spec: TaskSpec, doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """Description + solved shots, each followed by the few-shot delimiter; the row's text follows."""
    kind = KINDS.get(spec.kind, where=spec.task).obj
    description = render(spec.description, doc, where=spec.where("description")) if spec.description else ""
    return description + "".join(kind.shot(spec, s) + spec.fewshot_delimiter for s in shots)
