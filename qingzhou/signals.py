"""Stopping cleanly: Ctrl-C and SIGTERM end in a checkpoint and a one-line message, not lost work.

Schedulers (Slurm, Kubernetes, systemd) send SIGTERM before they kill a job; Python's default for it
is to die on the spot, skipping every `finally`. Two helpers change that:

* `graceful_stop()` around a training loop turns SIGINT/SIGTERM into a flag the loop polls after
  each optimizer step, so it can save a checkpoint at a step boundary and then raise `Interrupted`.
  A second Ctrl-C does not wait (it raises `KeyboardInterrupt` at once).
* `terminate_as_interrupt()` around a whole run makes SIGINT and SIGTERM raise `Interrupted` (a
  `KeyboardInterrupt`), so temp folders are removed and run.json says "interrupted", and it records
  the signal: when a library turns the KeyboardInterrupt into another error on its way up (seen in
  CI: a run sent SIGINT 0.5 s in failed with transformers' lazy-import `ModuleNotFoundError`), the
  run still ends as interrupted, not as a failure with a traceback. `cli.common.guarded` does the
  same around every command.

`fault_point(label)` marks the places where a crash would hurt most (just before a file or folder
is renamed into place, after each training step, at each stage start). It does nothing unless the
environment variable `QINGZHOU_FAULT_INJECT="N:SIGNAL"` is set, in which case the process sends
SIGNAL to itself at the N-th point: the fault-injection test kills runs mid-save that way.
`QINGZHOU_FAULT_LOG=FILE` appends each point's label to FILE (to count them).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after saving what it could; `message` says how to go on."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        self.message = message
        super().__init__(message or signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@dataclass
class StopRequest:
    """Set by the handlers of `graceful_stop`; polled by the loop at safe points."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Within the block SIGINT and SIGTERM only record a stop request (a second SIGINT raises
    KeyboardInterrupt at once). Outside the main thread signals cannot be caught: a no-op."""
    stop = StopRequest()
    if not _main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def terminate_as_interrupt(seen: StopRequest | None = None) -> Iterator[StopRequest]:
    """Within the block SIGINT and SIGTERM raise `Interrupted` and are recorded in `seen` (returned):
    whatever error the run then ends with, the caller knows a signal caused it."""
    seen = seen if seen is not None else StopRequest()
    if not _main_thread():
        yield seen
        return

    def handler(signum, frame):
        seen.signum = signum
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


_fault_count = 0


def fault_point(label: str) -> None:
    """A place where the fault-injection test may kill this process (see the module docstring)."""
    spec = os.environ.get("QINGZHOU_FAULT_INJECT")
    log = os.environ.get("QINGZHOU_FAULT_LOG")
    if not spec and not log:
        return
    global _fault_count
    _fault_count += 1
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{_fault_count} {label}\n")
    if spec:
        at, _, name = spec.partition(":")
        if int(at) == _fault_count:
            os.kill(os.getpid(), getattr(signal, name or "SIGKILL"))
