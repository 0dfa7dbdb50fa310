"""Shared CLI plumbing: error printing, shared options, --json output, tables. Commands stay a few
lines each.

Every user error reaches the terminal as one paragraph and exit code 2. Its text is printed with
rich markup escaped: paths and values come from the user, and `[red]` in a file name (or `[bnb]` in
a pip hint) is text, not a style.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qingzhou.errors import DeviceError, QingzhouError, UsageError
from qingzhou.signals import StopRequest, terminate_as_interrupt

STATE = {"debug": False}
_RESUME = "completed stages are kept; rerun with --resume to continue."  # an interrupt without its own message
out = Console()
err = Console(stderr=True)


def guarded(fn):
    """Run a command; print user errors as one paragraph (exit 2), tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        seen = StopRequest()  # Ctrl-C / SIGTERM during the command, whatever error a library makes of it
        try:
            with terminate_as_interrupt(seen):
                return fn(*args, **kwargs)
        except QingzhouError as e:
            if STATE["debug"]:
                raise
            print_error(e.kind, e.render())
            raise typer.Exit(2) from None
        except ValidationError as e:
            # settings built from flags (`moefy --top-k 8 --experts 4`) that a config model refuses
            if STATE["debug"]:
                raise
            print_error("settings error", settings_problems(e))
            raise typer.Exit(2) from None
        except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
            # a path the user gave that is in the way, not writable, or a file where a folder must be
            if STATE["debug"]:
                raise
            target = f"{e.filename}: " if e.filename else ""
            print_error("file error", f"{target}{e.strerror or e}.")
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (qingzhou.signals.Interrupted): say how to go on
            message = getattr(e, "message", "") or _RESUME
            err.print(f"[yellow]interrupted[/]: {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(e, "exit_code", 130)) from None
        except Exception:
            if not seen.requested or STATE["debug"]:
                raise
            err.print(f"[yellow]interrupted[/]: {escape(_RESUME)}", highlight=False, soft_wrap=True)
            raise typer.Exit(128 + seen.signum) from None

    return wrapper


def settings_problems(e: ValidationError) -> str:
    """`Title: key: problem (got value); ...` for a pydantic error, one line."""
    problems = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "settings"
        got = err.get("input")
        shown = f" (got {got!r})" if err["type"] != "missing" and not isinstance(got, dict | list) \
            and repr(got) not in err["msg"] else ""
        problems.append(f"{key}: {err['msg']}{shown}")
    return f"{e.title}: " + "; ".join(problems) + "."


def print_error(kind: str, text: str) -> None:
    """One paragraph on stderr: `kind:` in bold red, the (escaped) text after it."""
    err.print(f"[bold red]{escape(kind)}:[/] {escape(text)}", highlight=False, soft_wrap=True)


# Options every model-loading command takes: the same arguments `load_model` has.
AllowPickleOpt = typer.Option(False, "--allow-pickle", help="load pickle weights (.bin/.pt): they can run code; only for trusted files")
TrustRemoteCodeOpt = typer.Option(False, "--trust-remote-code", help="run the model repository's own Python code (auto_map); only for trusted authors")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="memory budget: 6GiB for the compute device, or cuda:0=6GiB,cpu=12GiB; the model is placed from its shards and layers that do not fit stream from disk")
OffloadFolderOpt = typer.Option(None, "--offload-folder", help="with --max-memory: where streamed 4-bit layers' kernel layout is cached (default: under $QINGZHOU_CACHE/offload)")
StreamingOpt = typer.Option(False, "--streaming", help="compress one decoder layer at a time from MODEL's safetensors "
                            "folder, for models larger than memory; run again after an interruption to resume")
ActivationsOpt = typer.Option("cpu", "--activations", help="with --streaming: calibration activations in RAM (cpu) "
                              "or in a memory-mapped file beside OUT (disk)")
StrictOpt = typer.Option(True, "--strict/--no-strict", help="refuse weights that do not match config.json (missing, unexpected or mis-shaped tensors)")


def load_options(allow_pickle: bool, trust_remote_code: bool, strict: bool,
                 max_memory: str | None = None, offload_folder: str | None = None) -> dict[str, Any]:
    """The `load_model` keyword arguments of the shared options (the big-model ones when given)."""
    opts: dict[str, Any] = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code, "strict": strict}
    if max_memory:
        opts.update(max_memory=max_memory, offload_folder=offload_folder)
    return opts


def check_device(device: str | None, flag: str = "--device") -> None:
    """Fail now, not after loading a model, when `device` is unknown or not on this machine."""
    if device and device.strip().lower() not in ("auto", "cpu"):
        from qingzhou.llm.devices import resolve_device

        try:
            resolve_device(device)
        except DeviceError as e:
            raise DeviceError(e.message, where=flag, hint=e.hint) from None


def check_out_dir(path: Path | str | None, flag: str = "OUT", force: bool | None = None) -> None:
    """An output folder must not be an existing file (checked before any work starts). With
    `force` given (the command has `--force`), also qingzhou's ownership rule: a non-empty folder
    only with `--force`, and only one qingzhou wrote (`io.check_output_dir`)."""
    if path is None:
        return
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise UsageError(f"{p} is a file, but a folder is needed here.", where=flag,
                             hint="Choose another output folder.")
    if force is not None:
        from qingzhou.io import check_output_dir

        check_output_dir(path, force)


def check_out_file(path: Path | str | None, flag: str = "--out", force: bool | None = None) -> None:
    """An output file must not be an existing folder, nor lie under a file; with `force` given,
    an existing file is replaced only with `--force` (`io.check_output_file`)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder, but a file is needed here.", where=flag)
    check_out_dir(path.parent, flag)
    if force is not None:
        from qingzhou.io import check_output_file

        check_output_file(path, force)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def emit_result(result: dict[str, Any], out_file: Any, as_json: bool) -> bool:
    """Write `result` to `--out` (atomically) if given, print it as JSON with `--json`; True when
    printed, so the command skips its tables."""
    if out_file:
        from qingzhou.io import atomic_write_json

        check_out_file(out_file)
        atomic_write_json(out_file, result)
    if as_json:
        print_json(result)
    return as_json


def table(title: str | None, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Table:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    t = Table(title=escape(title) if title else title, show_lines=False)
    for c in columns:
        t.add_column(escape(str(c)))
    for r in rows:
        t.add_row(*[_fmt(r.get(c)) for c in columns])
    return t


def kv_table(title: str | None, data: dict[str, Any]) -> Table:
    t = Table(title=escape(title) if title else title, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in data.items():
        t.add_row(escape(str(k)), _fmt(v))
    return t


def _fmt(v: Any) -> str:
    """A cell as text, markup escaped (cells hold user paths and prompts)."""
    return escape(_text(v))


def _text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_text(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_text(x) for x in v)
    return str(v)
