"""Fault injection: interrupt a multi-stage recipe run, resume it, and get exactly what an
uninterrupted run makes.

The recipe (load -> finetune (LoRA, dropout) -> export merge -> prune -> quantize -> eval) runs on
a tiny random model in a sandbox folder that is also the working directory, HOME and XDG cache.
Each of 20 trials stops the run with SIGINT or SIGKILL at a seeded random point - mid-save
(checkpoint, model or record writes, via the `QINGZHOU_FAULT_INJECT` hook that signals at the N-th
rename), mid-finetune (right after a training step), at any fault point, or after a random delay -
then runs `--resume` until it completes. Every trial must end with byte-identical safetensors, the
same other files and the same metrics as the uninterrupted run, and nothing in the sandbox outside
the trial's run directory may be created, changed or removed.

Runs are separate processes executing `python -m qingzhou.cli.main run ...`. Importing torch,
transformers and peft costs ~10 s per process on a busy 2-core machine, more than sixty runs can
afford, so the reference run is a plain subprocess and the trial runs are forked from a server
process that has imported those libraries once; each child then runs the CLI module with runpy, the
same code path as `python -m` (and the forked reference must equal the plain one).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRIALS = 20
ROWS = [{"instruction": f"Meter reading {i}?", "output": f"[ok] {i * 11} kWh"} for i in range(16)]
RECIPE = """\
name: faults
seed: 3
stages:
  - {kind: load, model: tiny, device: cpu, dtype: float32}
  - {kind: finetune, method: lora, r: 4, max_steps: 8, batch_size: 4, learning_rate: 0.01, dropout: 0.1,
     save_every: 2, progress: false, data: {source: rows.jsonl, eval_fraction: 0.2, cache: false}}
  - {kind: export}
  - {kind: prune, method: magnitude, sparsity: 0.5}
  - {kind: quantize, method: rtn, bits: 4, group_size: 32, save_format: dense}
  - {kind: eval, perplexity: {data: text.txt, seq_len: 32, max_windows: 8}}
"""
# what legitimately differs between two runs of the same recipe: clocks, speeds, how it resumed
VOLATILE = {"seconds", "tokens_per_s", "peak_memory_mb", "started_at", "finished_at", "resumed", "resumed_from",
            "notes", "environment"}

SERVER = r"""
import json, os, runpy, signal, sys, traceback
import qingzhou.cli.main, qingzhou.recipes.runner, qingzhou.finetune.loop, qingzhou.finetune.export, qingzhou.llm
import qingzhou.eval.perplexity, qingzhou.data.prepare, peft, accelerate, transformers
from qingzhou.recipes.registry import STAGES
from qingzhou.compress.quantize.registry import QUANTIZERS
from qingzhou.compress.prune.registry import PRUNERS
STAGES.load(); QUANTIZERS.load(); PRUNERS.load()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = ["qingzhou", *req["argv"]]
            runpy.run_module("qingzhou.cli.main", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkServer:
    """Starts runs of `qingzhou.cli.main` as forked children of one pre-imported process."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd = cwd
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=cwd, env=env)
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next(300).get("ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def _next(self, timeout: float) -> dict:
        return self.lines.get(timeout=timeout)

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(self.cwd), "env": env or {}, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return self._next(60)["pid"]

    def wait(self, pid: int, timeout: float = 300) -> int:
        try:
            return self._next(timeout)["rc"]
        except queue.Empty:
            os.kill(pid, signal.SIGKILL)
            self._next(60)
            raise AssertionError(f"run {pid} hung for {timeout} s") from None

    def run(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
        return self.wait(self.start(argv, log, env))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def tree(root: Path, skip: set[Path] = frozenset()) -> dict[str, str]:
    """Every file and folder under `root` (but `skip`), with a content hash for files."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for d in dirs:
            out[(here / d).relative_to(root).as_posix() + "/"] = "dir"
        for f in files:
            p = here / f
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _stable(value):
    if isinstance(value, dict):
        # peft keeps target_modules as a set and writes it in hash order, which differs per process
        return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else _stable(v)
                for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def artifacts(run_dir: Path) -> dict[str, object]:
    """What a finished run must reproduce: every file, JSON compared without clocks and speeds,
    everything else (safetensors, tokenizer, configs, README) byte for byte."""
    out: dict[str, object] = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir).as_posix()
        out[rel] = _stable(json.loads(path.read_text())) if path.suffix == ".json" else \
            hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_llama_dir):
    """A folder holding the recipe, model and data; it is the cwd, HOME and cache of every run."""
    box = tmp_path_factory.mktemp("sandbox")
    shutil.copytree(tiny_llama_dir, box / "tiny")
    (box / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (box / "text.txt").write_text("The grid operator balances supply and demand every second of the day. " * 8)
    (box / "recipe.yaml").write_text(RECIPE)
    (box / "home" / ".cache").mkdir(parents=True)
    (box / "runs").mkdir()
    logs = tmp_path_factory.mktemp("logs")  # outside the sandbox
    env = {k: v for k, v in os.environ.items() if not k.startswith("QINGZHOU_")}
    env.update(HOME=str(box / "home"), XDG_CACHE_HOME=str(box / "home" / ".cache"), PYTHONPATH=str(REPO),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1", TRANSFORMERS_VERBOSITY="error")
    return box, logs, env


@pytest.fixture(scope="module")
def server(sandbox):
    box, _, env = sandbox
    srv = ForkServer(box, env)
    yield srv
    srv.close()


def run_argv(name: str, *extra: str) -> list[str]:
    return ["run", "recipe.yaml", "--out", f"runs/{name}", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference(sandbox, server):
    """The uninterrupted run: once as a plain `python -m` process, once forked (timed, with every
    fault point logged); both must agree."""
    box, logs, env = sandbox
    before = tree(box)
    plain = subprocess.run([sys.executable, "-m", "qingzhou.cli.main", *run_argv("plain")], cwd=box, env=env,
                           capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    points = logs / "points.txt"
    t0 = time.perf_counter()
    rc = server.run(run_argv("reference"), logs / "reference.log", {"QINGZHOU_FAULT_LOG": str(points)})
    seconds = time.perf_counter() - t0
    assert rc == 0, (logs / "reference.log").read_text()[-3000:]
    ref = artifacts(box / "runs" / "reference")
    assert artifacts(box / "runs" / "plain") == ref
    after = tree(box, skip={box / "runs" / "plain", box / "runs" / "reference"})
    assert after == before  # nothing outside the run directories
    labels = [line.split(" ", 1)[1] for line in points.read_text().splitlines()]
    return ref, labels, seconds


def _pick_point(rng: random.Random, labels: list[str], kind: str) -> int:
    """A 1-based fault point: mid-save (a checkpoint's or model's files are written, not yet
    renamed into place), right after a training step, or anywhere."""
    if kind == "save":
        pool = [i for i, lab in enumerate(labels, 1)
                if lab.startswith(("commit step-", "swap ", "commit adapter", "commit model", "write state.json"))]
    elif kind == "step":
        pool = [i for i, lab in enumerate(labels, 1) if lab.startswith("step ")]
    else:
        pool = list(range(1, len(labels) + 1))
    assert pool, kind
    return rng.choice(pool)


def test_twenty_interrupted_runs_resume_to_identical_artifacts(sandbox, server, reference):
    box, logs, env = sandbox
    ref, labels, ref_seconds = reference
    assert ref["02-finetune/adapter/adapter_model.safetensors"] and ref["05-quantize/model/model.safetensors"]
    rng = random.Random(18)
    kinds = ["save", "step", "any", "delay"]
    identical, resumes, from_checkpoint, records = 0, 0, 0, []
    t_start = time.perf_counter()
    for trial in range(TRIALS):
        kind = kinds[trial % 4]
        sig = signal.SIGINT if (trial // 4) % 2 == 0 else signal.SIGKILL
        name = f"trial-{trial:02d}"
        run_dir = box / "runs" / name
        before = tree(box, skip={run_dir})
        log = logs / f"{name}.log"
        if kind == "delay":
            delay = rng.uniform(0.05, 0.9) * ref_seconds
            for _ in range(4):  # a busy machine may finish early: then stop sooner
                pid = server.start(run_argv(name), log)
                try:
                    rc = server._next(delay)["rc"]
                except queue.Empty:
                    os.kill(pid, sig)
                    rc = server.wait(pid)
                if rc != 0:
                    break
                shutil.rmtree(run_dir)
                delay /= 3
            where = f"after {delay:.2f} s"
        else:
            point = _pick_point(rng, labels, kind)
            rc = server.run(run_argv(name), log, {"QINGZHOU_FAULT_INJECT": f"{point}:{sig.name}"})
            where = f"at point {point} ({labels[point - 1]})"
        expected_rc = 130 if sig == signal.SIGINT else -signal.SIGKILL
        assert rc == expected_rc, (trial, where, rc, log.read_text()[-3000:])
        if sig == signal.SIGINT:
            assert "--resume" in log.read_text(), log.read_text()[-2000:]
        # an interrupted fine-tune must continue from its newest checkpoint, not start over
        ckpts = run_dir / "checkpoints" / "02-finetune"
        newest = max((p.name for p in ckpts.glob("step-*")), default=None) if ckpts.is_dir() else None
        finetune_done = (run_dir / "02-finetune" / "stage.json").is_file()
        for attempt in range(4):
            rc = server.run(run_argv(name, "--resume"), logs / f"{name}-resume{attempt}.log")
            resumes += 1
            if rc == 0:
                break
        assert rc == 0, (trial, where, (logs / f"{name}-resume{attempt}.log").read_text()[-3000:])
        if newest and not finetune_done:
            stage = json.loads((run_dir / "02-finetune" / "stage.json").read_text())
            assert stage["metrics"]["resumed_from"] == int(newest.removeprefix("step-")), (trial, where)
            from_checkpoint += 1
            where += f", resumed from {newest}"
        assert not (run_dir / "checkpoints").exists()  # removed once the stage completed
        got = artifacts(run_dir)
        diff = sorted(k for k in set(got) | set(ref) if got.get(k) != ref.get(k))
        assert not diff, (trial, where, diff)
        identical += 1
        assert tree(box, skip={run_dir}) == before, (trial, where)  # nothing outside the run directory
        records.append(f"{name}: {sig.name} {kind} {where}")
    elapsed = time.perf_counter() - t_start
    print(f"\nfault injection: {identical}/{TRIALS} trials identical to the uninterrupted run after {resumes} "
          f"resume(s), {from_checkpoint} of them continuing a fine-tune from its checkpoint; {elapsed:.0f} s "
          f"(reference run {ref_seconds:.1f} s, {len(labels)} fault points)\n" + "\n".join(records))
    assert from_checkpoint >= 5  # the draw above interrupts the fine-tune after a checkpoint that often
    assert identical == TRIALS


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(sandbox, server, reference):
    """What a scheduler sends: the fine-tune stops at the end of its step with a checkpoint of that
    step, the run exits 143 with one line naming the resume command, and resuming matches."""
    box, logs, env = sandbox
    ref, labels, _ = reference
    point = labels.index("step 5") + 1  # between the checkpoints of steps 4 and 6
    log = logs / "sigterm.log"
    rc = server.run(run_argv("sigterm"), log, {"QINGZHOU_FAULT_INJECT": f"{point}:SIGTERM"})
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert "Resume with: qingzhou run recipe.yaml --out" in text and "runs/sigterm --resume" in text
    assert "Traceback" not in text
    ckpts = box / "runs" / "sigterm" / "checkpoints" / "02-finetune"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-0000004", "step-0000005"]
    assert json.loads((box / "runs" / "sigterm" / "run.json").read_text())["status"] == "interrupted"
    rc = server.run(run_argv("sigterm", "--resume"), logs / "sigterm-resume.log")
    assert rc == 0
    resumed_log = (logs / "sigterm-resume.log").read_text()
    assert "02-finetune continues from its checkpoint step-0000005" in resumed_log
    assert artifacts(box / "runs" / "sigterm") == ref
