"""Run a recipe: one folder per stage, run.json after every stage, resume from complete stages.

Layout of a run directory:

    resolved_recipe.yaml   the recipe after overrides, as it ran
    run.json               config, versions, device, seed, data hashes, per-stage metrics/timings
    01-load/ stage.json    one folder per stage; stage.json is written last, inside a temp folder
    02-eval/ ...           that is renamed into place only when the stage has finished

A stage folder with a stage.json is complete by construction, so `--resume` trusts exactly those
(and only while the stage's config and everything before it are unchanged). A crash or Ctrl-C
leaves at most a `.NN-kind.*.tmp` folder, which is ignored and cleaned up.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qingzhou.errors import RecipeError
from qingzhou.io import atomic_dir, atomic_write_json, atomic_write_text
from qingzhou.recipes.context import ModelCache, ModelRef, StageContext
from qingzhou.recipes.registry import STAGES, StageConfig, stage_dir_name
from qingzhou.recipes.schema import Recipe, load_recipe

STAGE_FILE = "stage.json"


@dataclass
class RunResult:
    run_dir: Path
    status: str
    stages: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [s["metrics"] for s in self.stages if kind is None or s["kind"] == kind]

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "status": self.status, "stages": self.stages}


def config_hash(cfg: StageConfig) -> str:
    blob = json.dumps(cfg.to_recipe(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_stage(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_recipe(
    recipe: str | Path | Recipe,
    out_dir: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run every stage of `recipe` (a path, a built-in name or a `Recipe`) into `out_dir`.

    With `resume=True`, stages already complete in `out_dir` with an unchanged config (and
    unchanged stages before them) are skipped; everything after the first changed or incomplete
    stage runs again.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(recipe)
    if (run_dir / "run.json").exists() and not resume:
        raise RecipeError(f"{run_dir} already holds a run.", hint="Pass --resume to continue it, or choose another --out folder.")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)

    from qingzhou.llm.devices import env_info

    atomic_write_text(run_dir / "resolved_recipe.yaml", recipe.to_yaml())
    record: dict[str, Any] = {
        "name": recipe.name,
        "recipe_source": recipe.source,
        "overrides": recipe.overrides,
        "config": recipe.to_dict(),
        "seed": recipe.seed,
        "status": "running",
        "started_at": _now(),
        "finished_at": None,
        "environment": env_info("cpu" if _all_cpu(recipe) else "auto"),
        "data_hashes": {},
        "stages": [],
        "metrics": {},
    }
    atomic_write_json(run_dir / "run.json", record)

    cache = ModelCache()
    model_ref: ModelRef | None = None
    chain_intact = resume
    history: list[dict[str, Any]] = []
    try:
        for index, cfg in enumerate(recipe.stages, start=1):
            final_dir = run_dir / stage_dir_name(index, cfg.kind)
            chash = config_hash(cfg)
            done = _read_stage(final_dir) if chain_intact else None
            if done and done.get("config_hash") == chash and done.get("status") == "complete":
                entry = {**done, "resumed": True}
                model_ref = ModelRef.from_dict(done["model_out"]) if done.get("model_out") else model_ref
            else:
                chain_intact = False
                if final_dir.exists():
                    shutil.rmtree(final_dir)
                entry = _run_stage(STAGES.get(cfg.kind).obj, cfg, index, chash, run_dir, final_dir, recipe.seed, model_ref, history, cache)
                model_ref = ModelRef.from_dict(entry["model_out"]) if entry.get("model_out") else model_ref
            history.append(entry)
            record["stages"].append(_summary(entry))
            record["metrics"][entry["label"]] = entry["metrics"]
            record["data_hashes"].update(entry.get("data_hashes", {}))
            atomic_write_json(run_dir / "run.json", record)
        record["status"] = "complete"
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        raise
    except BaseException as e:
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        record["finished_at"] = _now()
        atomic_write_json(run_dir / "run.json", record)
        cache.clear()
    return RunResult(run_dir, record["status"], record["stages"])


def _all_cpu(recipe: Recipe) -> bool:
    return all(s.device == "cpu" for s in recipe.stages if s.kind == "load")


def _run_stage(fn, cfg: StageConfig, index: int, chash: str, run_dir: Path, final_dir: Path, seed: int, model_ref, history, cache) -> dict[str, Any]:
    from transformers import set_seed

    label = cfg.name or f"{index:02d}-{cfg.kind}"
    with atomic_dir(final_dir) as work_dir:
        ctx = StageContext(run_dir=run_dir, work_dir=work_dir, final_dir=final_dir, index=index, seed=seed, model_ref=model_ref, history=list(history), cache=cache)
        set_seed(seed)
        start = time.perf_counter()
        result = fn(cfg, ctx)
        seconds = time.perf_counter() - start
        entry = {
            "index": index,
            "kind": cfg.kind,
            "label": label,
            "dir": final_dir.name,
            "status": "complete",
            "config": cfg.to_recipe(),
            "config_hash": chash,
            "seconds": round(seconds, 3),
            "finished_at": _now(),
            "metrics": result.metrics,
            "data_hashes": result.data_hashes,
            "model_in": model_ref.to_dict() if model_ref else None,
            "model_out": (ctx.new_model_ref or model_ref).to_dict() if (ctx.new_model_ref or model_ref) else None,
        }
        atomic_write_json(work_dir / STAGE_FILE, entry)  # last write: marks the stage complete
    return entry


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("index", "kind", "label", "dir", "status", "seconds", "metrics", "model_out")
    out = {k: entry.get(k) for k in keys}
    out["resumed"] = bool(entry.get("resumed"))
    return out
