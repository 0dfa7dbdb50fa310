"""`evaluate(model, tokenizer, tasks)`: zero/few-shot task scores with standard errors.

The one public function behind `qingzhou eval tasks`, the recipe `eval` stage and notebooks. Each task
is a YAML file (see `qingzhou.eval.tasks`); all of a task's requests go to the LM in one call so they
are batched together across rows and subjects (longest first, shared inputs scored once).
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from qingzhou.errors import RecipeError
from qingzhou.eval.metrics import LOWER_IS_BETTER, aggregate, mean
from qingzhou.eval.tasks import load_task
from qingzhou.eval.tasks.data import DocGroup, load_groups
from qingzhou.eval.tasks.fewshot import build_prefix, sample_shots
from qingzhou.eval.tasks.kinds import KINDS
from qingzhou.llm.modes import eval_mode
from qingzhou.eval.tasks.spec import TaskSpec


def build_requests(spec: TaskSpec, group: DocGroup, num_fewshot: int, seed: int,
                   limit: int | None) -> tuple[list[dict], list[list]]:
    """The scored rows of a group (first `limit`) and each row's request arguments."""
    kind = KINDS.get(spec.kind, where=spec.task).obj
    docs = group.docs[:limit] if limit is not None else group.docs
    rng = random.Random(seed)
    requests = []
    for doc in docs:
        pool, exclude = (group.fewshot, None) if group.fewshot is not None else (group.docs, doc)
        shots = sample_shots(pool, num_fewshot, rng, spec.fewshot_sampler, exclude=exclude)
        requests.append(kind.requests(spec, doc, build_prefix(spec, doc, shots)))
    return docs, requests


def run_task(lm: Any, spec: TaskSpec, groups: list[DocGroup], *, num_fewshot: int = 0,
             limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Score one task on an `HFLM`; `limit` applies per group (per subject for suites, as lm-eval)."""
    if spec.kind == "rolling" and num_fewshot:
        raise RecipeError("corpus perplexity tasks are zero-shot.", where=f"tasks.{spec.task}",
                          hint="Use num_fewshot=0.")
    start = time.perf_counter()
    kind = KINDS.get(spec.kind, where=spec.task).obj
    per_group: list[tuple[DocGroup, list[dict], list[list]]] = []
    flat: list = []
    for group in groups:
        docs, requests = build_requests(spec, group, num_fewshot, seed, limit)
        per_group.append((group, docs, requests))
        for reqs in requests:
            flat.extend(reqs)
    lm.label = spec.task
    answers = getattr(lm, kind.request_type)(flat)
    rows_by_group: list[tuple[DocGroup, list[dict]]] = []
    pos = 0
    for group, docs, requests in per_group:
        rows = []
        for doc, reqs in zip(docs, requests):
            rows.append(kind.score(spec, doc, answers[pos : pos + len(reqs)], lm))
            pos += len(reqs)
        rows_by_group.append((group, rows))
    all_rows = [r for _, rows in rows_by_group for r in rows]
    if not all_rows:
        raise RecipeError(f"task {spec.task!r} has no rows to score.", where=f"tasks.{spec.task}")
    result: dict[str, Any] = {"task": spec.task, "metric": spec.headline, "n": len(all_rows),
                              "num_fewshot": num_fewshot, "metrics": {}}
    for metric in spec.metrics:
        value, stderr = aggregate(metric, all_rows)
        result["metrics"][metric] = value
        result["metrics"][f"{metric}_stderr"] = stderr
    if spec.subjects:
        result["subjects"] = {g.subject: {"acc": aggregate("acc", rows)[0], "n": len(rows)}
                              for g, rows in rows_by_group if rows}
        result["metrics"]["acc_macro"] = mean([s["acc"] for s in result["subjects"].values()])
    result["score"] = result["metrics"][spec.headline]
    result["stderr"] = result["metrics"][f"{spec.headline}_stderr"]
    result["higher_is_better"] = spec.headline not in LOWER_IS_BETTER
    result["source"] = groups[0].source if len(groups) == 1 else f"{groups[0].source} (+{len(groups) - 1})"
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def evaluate(model: Any, tokenizer: Any, tasks: list[str], *, num_fewshot: int = 0,
             limit: int | None = None, batch_size: int = 8, seed: int = 0,
             data_dir: str | Path | None = None, paths: dict[str, str] | None = None,
             source: str = "auto", max_length: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score `model` on each task (a shipped name such as "arc_easy", or a task YAML path).

    Returns `{"results": {task: {score, stderr, metric, n, seconds, metrics, ...}}, "config": ...}`.
    `limit` keeps the first N rows of each task (of each subject for CMMLU / C-Eval); `paths` maps a
    task to its own data file; `source` forces "local" or "hub" data.
    """
    from qingzhou.eval.lm import HFLM

    if not tasks:
        raise RecipeError("no tasks given.", where="tasks")
    if num_fewshot < 0 or (limit is not None and limit < 1):
        raise RecipeError("num_fewshot must be >= 0 and limit >= 1.", where="tasks")
    specs = [load_task(t) for t in tasks]  # fail on a typo before any data or model work
    groups = {s.task: load_groups(s, data_dir, (paths or {}).get(s.task), source) for s in specs}
    lm = HFLM(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress)
    start = time.perf_counter()
    with eval_mode(model):
        results = {s.task: run_task(lm, s, groups[s.task], num_fewshot=num_fewshot, limit=limit, seed=seed)
                   for s in specs}
    return {
        "results": results,
        "config": {"tasks": [s.task for s in specs], "num_fewshot": num_fewshot, "limit": limit,
                   "batch_size": batch_size, "seed": seed, "max_length": lm.max_length,
                   "device": str(lm.device), "dtype": str(next(model.parameters()).dtype)},
        "seconds": round(time.perf_counter() - start, 3),
    }
