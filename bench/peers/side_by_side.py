"""Run llm-compressor next to qingzhou in our quality benchmarks.

llm-compressor 0.14 pins transformers<=5.17 while qingzhou uses 5.23, so it lives in its own venv
(`bench/peers/README.md` has the setup). Our benchmark scripts call `run_peers`, which runs
`llmc_run.py` in that venv as a subprocess and returns its rows for the same table/JSON.

Fairness is checked, not assumed: this side tokenizes the calibration set and the evaluation
windows with *our* transformers, passes their SHA-256 to the driver, and the driver refuses to
run if its own token ids (tokenized under transformers 5.17) differ. Everything in this file
except `run_peers`/`expected_fingerprints` is also imported by the driver inside the venv, so it
must not import torch/transformers at module level.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
REPO = Path(__file__).resolve().parents[2]
CALIB_SOURCE = SHARED / "llamafactory" / "c4_demo.jsonl"
EVAL_SOURCE = SHARED / "wikitext-2-raw" / "wiki.test.raw"
SEQ_LEN_CALIB, SEQ_LEN_EVAL = 512, 2048
PEER_PYTHON = os.environ.get("QZ_PEER_PYTHON", "/work/llmc-venv/bin/python")
DRIVER = Path(__file__).with_name("llmc_run.py")

# What `--peers` with no value runs in each benchmark (AWQ is opt-in: ~40 min on 2 CPU cores).
QUANT_PEERS = "llmc-gptq-asym-4,llmc-gptq-sym-4,llmc-gptq-asym-3,llmc-gptq-sym-3"
PRUNE_PEERS = "llmc-sparsegpt-50,llmc-wanda-50,llmc-sparsegpt-2:4,llmc-wanda-2:4"


@dataclass(frozen=True)
class PeerSetting:
    """One llm-compressor run. kind: dense | gptq | awq | sparsegpt | wanda."""

    name: str
    kind: str
    bits: int = 0
    group_size: int = 64
    sym: bool = False
    sparsity: float = 0.0
    mask: str = "0:0"  # llm-compressor's mask_structure: "0:0" unstructured, "2:4" N:M

    @property
    def timing_key(self) -> str:
        """The row key our own scripts use for the compression time."""
        return "quantize_s" if self.kind in ("gptq", "awq") else "prune_s"


def parse_peer_setting(name: str) -> PeerSetting:
    """`llmc-dense` | `llmc-{gptq,awq}-{sym,asym}-{bits}[-g{group}]` | `llmc-{sparsegpt,wanda}-{50|2:4|<pct>}`.

    The names mirror ours (`gptq-asym-4`, `sparsegpt-2:4`) with an `llmc-` prefix, so rows line up.
    """
    parts = name.split("-")
    if parts[0] != "llmc" or len(parts) < 2:
        raise ValueError(f"peer setting {name!r} must start with 'llmc-' (e.g. llmc-gptq-asym-4).")
    kind = parts[1]
    if kind == "dense" and len(parts) == 2:
        return PeerSetting(name, "dense")
    if kind in ("gptq", "awq") and len(parts) in (4, 5) and parts[2] in ("sym", "asym"):
        group = int(parts[4].removeprefix("g")) if len(parts) == 5 else 64
        return PeerSetting(name, kind, bits=int(parts[3]), group_size=group, sym=parts[2] == "sym")
    if kind in ("sparsegpt", "wanda") and len(parts) == 3:
        amount = parts[2]
        if ":" in amount:
            n, m = (int(x) for x in amount.split(":"))
            return PeerSetting(name, kind, sparsity=n / m, mask=amount)
        return PeerSetting(name, kind, sparsity=int(amount) / 100)
    raise ValueError(f"unknown peer setting {name!r}: expected llmc-dense, llmc-gptq-asym-4[-g64], "
                     "llmc-awq-asym-4, llmc-sparsegpt-50, llmc-wanda-2:4, ...")


def calibration_config(calib_rows: int):
    """The calibration our benchmarks use: c4_demo rows with >= 512 tokens, truncated to 512."""
    from qingzhou.data.calibration import CalibrationConfig

    return CalibrationConfig(source=str(CALIB_SOURCE), mode="rows", seq_len=SEQ_LEN_CALIB, num_samples=calib_rows)


def fingerprint(tensors) -> str:
    """SHA-256 over tensors (dtype, shape and values), to prove two environments saw the same
    token ids, or loaded the same weights."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def token_fingerprints(tokenizer, calib_rows: int, windows: int) -> dict[str, str | int]:
    """Fingerprints of the calibration samples and evaluation windows as `tokenizer` cuts them,
    through the same qingzhou functions the benchmarks call."""
    from qingzhou.data.calibration import load_calibration
    from qingzhou.data.corpus import load_text
    from qingzhou.eval.perplexity import tokenize_windows

    calib = load_calibration(tokenizer, calibration_config(calib_rows))
    windows_ids = tokenize_windows(tokenizer, load_text(str(EVAL_SOURCE)), SEQ_LEN_EVAL, windows)
    return {"calib_sha": fingerprint(calib), "calib_samples": len(calib), "eval_sha": fingerprint([windows_ids])}


def run_peers(settings: str, *, windows: int, calib_rows: int, threads: int, tokenizer=None,
              python: str = PEER_PYTHON, append: str | None = None) -> list[dict]:
    """Run llm-compressor `settings` (comma-separated) in the peer venv; return its JSON rows.

    Every setting starts from a fresh copy of the dense model inside the driver. Rows carry
    `peer` (library and version) and the token fingerprints the driver checked against ours.
    """
    if not Path(python).exists():
        raise FileNotFoundError(f"peer interpreter {python} not found: create the venv as in "
                                f"{Path(__file__).with_name('README.md')} or set QZ_PEER_PYTHON.")
    for name in settings.split(","):
        parse_peer_setting(name)  # fail before the long run, not after
    if tokenizer is None:
        tokenizer = _load_tokenizer()
    expected = token_fingerprints(tokenizer, calib_rows, windows)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        cmd = [python, str(DRIVER), "--settings", settings, "--windows", str(windows), "--calib-rows", str(calib_rows),
               "--threads", str(threads), "--expect-calib-sha", str(expected["calib_sha"]),
               "--expect-eval-sha", str(expected["eval_sha"]), "--out", str(out)]
        if append:
            cmd += ["--append", append]
        proc = subprocess.run(cmd, cwd=REPO)  # its log streams to our stdout/stderr
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    if proc.returncode != 0:
        raise RuntimeError(f"the llm-compressor driver failed (exit {proc.returncode}) after {len(rows)} of "
                           f"{len(settings.split(','))} settings; its log is above.")
    return rows


def _load_tokenizer():
    from transformers import AutoTokenizer

    from qingzhou.llm import resolve_source

    src = resolve_source("smollm2")
    return AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
