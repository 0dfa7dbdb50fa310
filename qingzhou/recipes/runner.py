"""Run a recipe: one folder per stage, run.json after every stage, resume from complete stages.

Layout of a run directory:

    resolved_recipe.yaml   the recipe after overrides, as it ran
    run.json               config, versions, device, seed, data hashes, per-stage metrics/timings
    01-load/ stage.json    one folder per stage; stage.json is written last, inside a temp folder
    02-eval/ ...           that is renamed into place only when the stage has finished
    checkpoints/03-finetune/   training checkpoints of a stage that has not finished yet: beside,
                           not inside, its temp folder, so Ctrl-C, SIGTERM or a crash keeps them;
                           removed once the stage is complete

A stage folder with a stage.json is complete by construction, so `--resume` trusts exactly those,
and only while everything the stage was made from is unchanged: its settings, the files it names
(content hashes), qingzhou's code (version + a hash of its source) and the stage before it (each
stage.json records a token of its inputs, chained from the previous stage's token). The first
stage that differs reruns with a message saying why, and so does every stage after it; an
interrupted fine-tune or distill stage continues from its last checkpoint, to the same weights an
uninterrupted run makes. A crash leaves at most `.*.tmp` folders, which are ignored and removed.
Paths in run.json and stage.json are relative to the run directory, so a run resumes from any
working directory. Nothing is written outside the run directory (and the declared data caches).
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qingzhou.errors import RecipeError
from qingzhou.io import (
    OutputError,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    discard_dir,
    fingerprint_path,
    is_qingzhou_dir,
)
from qingzhou.recipes.context import ModelCache, ModelRef, StageContext
from qingzhou.recipes.registry import STAGES, StageConfig, stage_dir_name
from qingzhou.recipes.schema import Recipe, load_recipe
from qingzhou.signals import Interrupted, StopRequest, fault_point, terminate_as_interrupt

STAGE_FILE = "stage.json"
CHECKPOINTS = "checkpoints"
# settings that change how often a stage saves or what it prints, never what it produces
NOT_IDENTITY = frozenset({"progress", "save_every", "save_every_minutes", "keep_checkpoints", "resume"})
# settings naming folders a stage writes (caches), not inputs: their contents are not fingerprinted
NOT_INPUTS = frozenset({"kind", "name", "cache_dir"})


@dataclass
class RunResult:
    run_dir: Path
    status: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [s["metrics"] for s in self.stages if kind is None or s["kind"] == kind]

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "status": self.status, "stages": self.stages, "notes": self.notes}


def config_hash(cfg: StageConfig) -> str:
    recipe = {k: v for k, v in cfg.to_recipe().items() if k not in NOT_IDENTITY}
    blob = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """qingzhou's version plus a hash of its source files: a result made by other code is not
    trusted on resume (a development checkout changes without a version bump)."""
    from qingzhou._version import __version__

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in {".pyc", ".pyo"}:
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def input_hashes(cfg: StageConfig) -> dict[str, str]:
    """Content fingerprints of the local files and folders a stage's settings name (data, models,
    task files), keyed as written; `builtin:` and other scheme sources are covered by the code
    version, hub ids cannot be checked."""
    found: dict[str, str] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in NOT_INPUTS:
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and 0 < len(value) < 4096 and "\n" not in value and not _SCHEME.match(value):
            try:
                path = Path(value).expanduser()
                if path.exists() and value not in found:
                    found[value] = fingerprint_path(path)
            except OSError:
                pass

    walk(cfg.to_recipe())
    return found


def stage_identity(cfg: StageConfig, after: str, code: str) -> dict[str, Any]:
    """What a stage's result depends on, and a token of it that the next stage chains onto."""
    ident: dict[str, Any] = {"config_hash": config_hash(cfg), "input_hashes": input_hashes(cfg), "code_version": code,
                             "after": after}
    ident["token"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return ident


def why_rerun(done: dict[str, Any], ident: dict[str, Any]) -> str | None:
    """None when a recorded stage (or checkpoint owner) matches `ident`; else the reason, in words."""
    if done.get("token") == ident["token"]:
        return None
    if "token" not in done:
        return "it was made by an older qingzhou that did not record its inputs"
    if done.get("config_hash") != ident["config_hash"]:
        return "its settings changed"
    if done.get("code_version") != ident["code_version"]:
        return f"qingzhou's code changed ({done.get('code_version')} -> {ident['code_version']})"
    old, new = done.get("input_hashes") or {}, ident["input_hashes"]
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        parts = [f"{k} is gone (relative paths are read from the working directory)" if k not in new
                 else f"{k} is new" if k not in old else f"{k} changed (sha256 {old[k][-8:]} -> {new[k][-8:]})"
                 for k in changed]
        return "its data changed: " + "; ".join(parts)
    if done.get("after") != ident["after"]:
        return "the stage before it has changed since it ran"
    return "its inputs changed"


def safe_run_name(name: str) -> str:
    """A recipe `name:` made safe to be one folder name: no separators, no leading dots, no `..`
    (so `name: ../../elsewhere` stays inside runs/)."""
    cleaned = re.sub(r"[^\w.-]+", "-", name).strip(".-")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)
    return cleaned[:80] or "run"


def default_run_dir(recipe: Recipe) -> Path:
    path = Path("runs") / f"{safe_run_name(recipe.name)}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    assert path.parent == Path("runs") and ".." not in path.parts
    return path


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_stage(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stderr(message: str) -> None:
    sys.stderr.write(f"qingzhou: {message}\n")
    sys.stderr.flush()


# ------------------------------------------------------------------------------ run directory


def _claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that holds something else; start an old run over with `overwrite`."""
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError("the run directory is a file.", where=str(run_dir), hint="Choose a folder for --out.")
    if (run_dir / "run.json").exists():
        if resume:
            return
        if overwrite and is_qingzhou_dir(run_dir):
            discard_dir(run_dir)
            return
        raise RecipeError(f"{run_dir} already holds a run.",
                          hint="Pass --resume to continue it, --force to start it over, or choose another --out folder.")
    if run_dir.is_dir() and any(not p.name.endswith(".tmp") for p in run_dir.iterdir()):
        raise OutputError("the run directory is not empty and holds no run (no run.json); qingzhou never writes into "
                          "such a folder, not even with --force.", where=str(run_dir),
                          hint="Choose a new --out folder.")


def _clean_temp(folder: Path) -> None:
    """Remove what an interrupted write left: `.*.tmp` files and folders (never trusted)."""
    for stale in folder.glob(".*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _remove_stage_dir(final_dir: Path) -> None:
    if not (is_qingzhou_dir(final_dir) or (final_dir / STAGE_FILE).is_file() or not any(final_dir.iterdir())):
        raise OutputError("this stage folder was not written by qingzhou, so it is not replaced.", where=str(final_dir),
                          hint="Move it away, or run into a new --out folder.")
    discard_dir(final_dir, require_marker=False)


def _check_checkpoints(ckpt_dir: Path, ident: dict[str, Any], say: Callable[[str], None]) -> None:
    """Keep a stage's checkpoints only if they were made from the same inputs; say what happens."""
    if not ckpt_dir.is_dir():
        return
    try:
        owner = json.loads((ckpt_dir / StageContext.CHECKPOINT_OWNER).read_text())
    except (OSError, json.JSONDecodeError):
        owner = None
    why = why_rerun(owner, ident) if isinstance(owner, dict) else "they carry no record of their inputs"
    if why is not None:
        say(f"discarding the checkpoints of {ckpt_dir.name}: {why}.")
        discard_dir(ckpt_dir, require_marker=False)
        return
    _clean_temp(ckpt_dir)
    from qingzhou.finetune.checkpoint import latest_checkpoint

    latest = latest_checkpoint(root=ckpt_dir)
    if latest is not None:
        say(f"{ckpt_dir.name} continues from its checkpoint {latest.name}.")


def _drop_checkpoints(run_dir: Path, ckpt_dir: Path) -> None:
    """A completed stage needs no checkpoints (its folder is trusted instead)."""
    if ckpt_dir.exists():
        discard_dir(ckpt_dir, require_marker=False)
    with_ckpts = run_dir / CHECKPOINTS
    if with_ckpts.is_dir() and not any(with_ckpts.iterdir()):
        with_ckpts.rmdir()


# ---------------------------------------------------------------------- portable run records


def _ref_to_disk(ref: dict[str, Any] | None, run_dir: Path) -> dict[str, Any] | None:
    """A model reference with an artifact path relative to the run directory (`in_run_dir`)."""
    if not ref:
        return ref
    source = Path(ref["source"])
    if source.is_absolute() and source.is_relative_to(run_dir):
        return {**ref, "source": source.relative_to(run_dir).as_posix(), "in_run_dir": True}
    return dict(ref)


def _ref_from_disk(ref: dict[str, Any] | None, run_dir: Path) -> dict[str, Any] | None:
    if not ref:
        return ref
    ref = dict(ref)
    if ref.pop("in_run_dir", False):
        ref["source"] = str(run_dir / ref["source"])
    return ref


def _entry_from_disk(entry: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """stage.json as stages see it in `ctx.history`: model references loadable from here."""
    return {**entry, "model_in": _ref_from_disk(entry.get("model_in"), run_dir),
            "model_out": _ref_from_disk(entry.get("model_out"), run_dir)}


def _portable(value: Any, prefixes: list[tuple[str, str]]) -> Any:
    """Strings that start with an absolute run path rewritten relative to the run directory (the
    stage's temp folder becomes its final folder name)."""
    if isinstance(value, dict):
        return {k: _portable(v, prefixes) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_portable(v, prefixes) for v in value]
    if isinstance(value, str):
        for prefix, replacement in prefixes:
            if value == prefix or value.startswith(prefix + os.sep):
                return replacement + value[len(prefix):] if replacement else value[len(prefix) + 1:]
    return value


# ----------------------------------------------------------------------------------- running


def run_recipe(
    recipe: str | Path | Recipe,
    out_dir: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Run every stage of `recipe` (a path, a built-in name or a `Recipe`) into `out_dir`.

    With `resume=True`, stages already complete in `out_dir` whose inputs are unchanged (settings,
    data and model files, qingzhou's code, the stages before them) are skipped, an interrupted
    training stage continues from its checkpoint, and everything after the first changed or
    incomplete stage runs again; `log` (default: stderr) hears why. `overwrite=True` starts an
    existing run over. SIGINT/SIGTERM end in `Interrupted` (a KeyboardInterrupt) whose message
    says how to resume.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    say = log or _stderr
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        say(message)

    run_dir = (Path(out_dir) if out_dir is not None else default_run_dir(recipe)).absolute()
    _claim_run_dir(run_dir, resume=resume, overwrite=overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean_temp(run_dir)

    from qingzhou.llm.devices import env_info

    code = code_version()
    record: dict[str, Any] = {
        "name": recipe.name,
        "written_by": "qingzhou",
        "qingzhou_version": code,
        "recipe_source": recipe.source,
        "overrides": recipe.overrides,
        "config": recipe.to_dict(),
        "seed": recipe.seed,
        "status": "running",
        "started_at": _now(),
        "finished_at": None,
        "environment": env_info("cpu" if _all_cpu(recipe) else "auto"),
        "data_hashes": {},
        "input_hashes": {},
        "stages": [],
        "metrics": {},
        "notes": notes,
    }
    atomic_write_json(run_dir / "run.json", record)  # first: a folder with run.json is a run
    atomic_write_text(run_dir / "resolved_recipe.yaml", recipe.to_yaml())

    cache = ModelCache()
    model_ref: ModelRef | None = None
    chain_intact = resume
    history: list[dict[str, Any]] = []
    after = ""
    current: str | None = None
    seen = StopRequest()  # the signal that stopped the run, if one did
    try:
        with terminate_as_interrupt(seen):
            for index, cfg in enumerate(recipe.stages, start=1):
                name = stage_dir_name(index, cfg.kind)
                final_dir, ckpt_dir = run_dir / name, run_dir / CHECKPOINTS / name
                ident = stage_identity(cfg, after, code)
                done = _read_stage(final_dir) if chain_intact else None
                why = why_rerun(done, ident) if done else None
                if done and why is None:
                    entry = {**_entry_from_disk(done, run_dir), "resumed": True}
                    _drop_checkpoints(run_dir, ckpt_dir)  # left over by a crash between completion and cleanup
                else:
                    if chain_intact:
                        later = len(recipe.stages) - index
                        rest = f"; the {later} stage(s) after it run again too" if later else ""
                        if done:
                            note(f"resume: {name} runs again because {why}{rest}.")
                        elif index > 1:
                            note(f"resume: stages before {name} are complete and unchanged; continuing at {name}.")
                    chain_intact = False
                    if final_dir.exists():
                        _remove_stage_dir(final_dir)
                    _check_checkpoints(ckpt_dir, ident, note)
                    current = name
                    fault_point(f"stage {name}")
                    entry = _run_stage(STAGES.get(cfg.kind).obj, cfg, index, ident, run_dir, final_dir, ckpt_dir, recipe.seed,
                                       model_ref, history, cache)
                    current = None
                    _drop_checkpoints(run_dir, ckpt_dir)
                model_ref = ModelRef.from_dict(entry["model_out"]) if entry.get("model_out") else model_ref
                after = entry.get("token", "")
                history.append(entry)
                record["stages"].append(_summary(_read_stage(final_dir) or {}, entry))
                record["metrics"][entry["label"]] = entry["metrics"]
                record["data_hashes"].update(entry.get("data_hashes", {}))
                record["input_hashes"].update(entry.get("input_hashes", {}))
                atomic_write_json(run_dir / "run.json", record)
        record["status"] = "complete"
    except BaseException as e:
        # Ctrl-C or SIGTERM (Interrupted), or any error after a recorded signal (a library turned
        # its KeyboardInterrupt into another error): interrupted, resumable; anything else failed
        if not (isinstance(e, KeyboardInterrupt) or seen.requested):
            record["status"] = "failed"
            record["error"] = f"{type(e).__name__}: {e}"
            raise
        record["status"] = "interrupted"
        record["error"] = message = _resume_hint(recipe, run_dir, current)
        if isinstance(e, Interrupted):
            e.message = message
            raise
        raise Interrupted(seen.signum or signal.SIGINT, message) from (None if isinstance(e, KeyboardInterrupt) else e)
    finally:
        record["finished_at"] = _now()
        atomic_write_json(run_dir / "run.json", record)
        cache.clear()
    # run.json keeps run-relative paths (portable); the caller gets model references it can load
    stages = [{**st, "model_out": _ref_from_disk(st.get("model_out"), run_dir)} for st in record["stages"]]
    return RunResult(run_dir, record["status"], stages, notes)


def _resume_hint(recipe: Recipe, run_dir: Path, current: str | None) -> str:
    """One line: where the run stopped, what is kept, the command that continues it."""
    ckpt = current is not None and (run_dir / CHECKPOINTS / current).is_dir()
    kept = "completed stages" + (f" and the checkpoints of {current}" if ckpt else "") + " are kept"
    where = f" during {current}" if current else ""
    if recipe.source == "<memory>":
        how = f"run_recipe(..., out_dir={str(run_dir)!r}, resume=True)"
    else:
        how = " ".join(["qingzhou run", shlex.quote(recipe.source), "--out", shlex.quote(str(run_dir)), "--resume",
                        *(f"-s {shlex.quote(o)}" for o in recipe.overrides)])
    return f"stopped{where}; {kept}. Resume with: {how}"


def _all_cpu(recipe: Recipe) -> bool:
    return all(s.device == "cpu" for s in recipe.stages if s.kind == "load")


def _run_stage(fn, cfg: StageConfig, index: int, ident: dict[str, Any], run_dir: Path, final_dir: Path, ckpt_dir: Path,
               seed: int, model_ref, history, cache) -> dict[str, Any]:
    """Run one stage in a temp folder that becomes `final_dir`; returns its entry as stages see it
    (stage.json holds the same with run-relative paths)."""
    from transformers import set_seed

    label = cfg.name or f"{index:02d}-{cfg.kind}"
    with atomic_dir(final_dir, what=f"recipe stage {final_dir.name}") as work_dir:
        ctx = StageContext(run_dir=run_dir, work_dir=work_dir, final_dir=final_dir, index=index, seed=seed, model_ref=model_ref,
                           history=list(history), cache=cache, checkpoint_dir=ckpt_dir,
                           checkpoint_identity={"stage": final_dir.name, **ident})
        set_seed(seed)
        start = time.perf_counter()
        result = fn(cfg, ctx)
        seconds = time.perf_counter() - start
        out_ref = ctx.new_model_ref or model_ref
        prefixes = [(str(work_dir), final_dir.name), (str(final_dir), final_dir.name), (str(run_dir), "")]
        entry = {
            "index": index,
            "kind": cfg.kind,
            "label": label,
            "dir": final_dir.name,
            "status": "complete",
            "config": cfg.to_recipe(),
            **ident,
            "seconds": round(seconds, 3),
            "finished_at": _now(),
            "metrics": _portable(result.metrics, prefixes),
            "data_hashes": result.data_hashes,
            "model_in": _ref_to_disk(model_ref.to_dict() if model_ref else None, run_dir),
            "model_out": _ref_to_disk(out_ref.to_dict() if out_ref else None, run_dir),
        }
        atomic_write_json(work_dir / STAGE_FILE, entry)  # last write: marks the stage complete
    return _entry_from_disk(entry, run_dir)


def _summary(disk: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """run.json's line for a stage: from stage.json (run-relative paths)."""
    source = disk or entry
    keys = ("index", "kind", "label", "dir", "status", "seconds", "metrics", "model_out")
    out = {k: source.get(k) for k in keys}
    out["resumed"] = bool(entry.get("resumed"))
    return out
