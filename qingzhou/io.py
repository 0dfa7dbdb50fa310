"""Atomic file and folder writes, ownership markers, hashing.

Every artifact qingzhou writes goes through here: a temp file (or folder) next to the target, then
an `os.replace`, so a crash or Ctrl-C never leaves a half-written file that a later `--resume`
would trust.

Never deleting what qingzhou did not write: every folder `atomic_dir` creates carries a small
marker file (`.qingzhou`, JSON naming the writer). An existing non-empty folder is replaced only
when the caller asks for it (`overwrite=True`, the CLI's `--force`) *and* the folder carries that
marker (or is a qingzhou run directory, recognised by its run.json); anything else is refused with
a one-paragraph `OutputError`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qingzhou.errors import QingzhouError
from qingzhou.signals import fault_point

MARKER = ".qingzhou"


class OutputError(QingzhouError):
    """An output path that qingzhou will not write: a file, a folder of someone else's, or a
    non-empty folder without --force."""

    kind = "output error"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_default_mode(path: str | Path) -> None:
    """Give a file made by `tempfile.mkstemp` (mode 0600) the mode `open()` would have given it
    (0666 less the umask) before it is renamed into place."""
    os.chmod(path, 0o666 & ~_umask())


def _default_modes(folder: Path) -> None:
    """Give every file written into a new folder the mode `open()` would have given it: some
    writers (safetensors, `tempfile.mkstemp`) create 0600 files, which a serving process running
    as another user or in a container could not read."""
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            set_default_mode(f)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block ends, the file written there is fsynced,
    given normal permissions and renamed onto `path`. On any exception (Ctrl-C included) the temp
    file goes and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        set_default_mode(tmp)  # mkstemp makes 0600; give the file normal permissions
        fault_point(f"write {path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` via a temp file in the same folder and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_marker(folder: str | Path, what: str = "") -> None:
    """Mark `folder` as written by qingzhou (what wrote it, which version)."""
    from qingzhou._version import __version__

    info = {"written_by": "qingzhou", "version": __version__, "what": what}
    (Path(folder) / MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")


def is_qingzhou_dir(path: str | Path) -> bool:
    """True for a folder qingzhou wrote: it carries the marker, or it is a run directory (run.json
    with the keys the runner writes)."""
    path = Path(path)
    try:
        info = json.loads((path / MARKER).read_text(encoding="utf-8"))
        if isinstance(info, dict) and info.get("written_by") == "qingzhou":
            return True
    except (OSError, ValueError):
        pass
    try:
        run = json.loads((path / "run.json").read_text(encoding="utf-8"))
        return isinstance(run, dict) and {"stages", "status", "environment"} <= set(run)
    except (OSError, ValueError):
        return False


def _non_empty(path: Path) -> bool:
    with os.scandir(path) as it:
        return any(True for _ in it)


def check_output_dir(path: str | Path, overwrite: bool = False, *, flag: str = "--force") -> Path:
    """Refuse an output folder that qingzhou must not replace; call before long work, so a user
    learns it in a second rather than after an hour. An empty or missing folder is fine; a
    non-empty one needs `overwrite` (the CLI's `flag`) and qingzhou's marker."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError("this output path is a file, not a folder.", where=str(path),
                          hint="Choose a folder name (qingzhou writes several files into it).")
    if path.is_dir() and _non_empty(path):
        if not overwrite:
            raise OutputError("the output folder is not empty.", where=str(path),
                              hint=f"Choose a new folder, or pass {flag} to replace a folder qingzhou wrote.")
        if not is_qingzhou_dir(path):
            raise OutputError(f"the output folder was not written by qingzhou (no {MARKER} marker), so it is "
                              f"never replaced, not even with {flag}.", where=str(path),
                              hint="Choose another folder, or move its contents away yourself.")
    return path


def check_output_file(path: str | Path, overwrite: bool = False, *, flag: str = "--force") -> Path:
    """Refuse to overwrite an existing file unless asked (`overwrite`, the CLI's `flag`), and a
    folder always; call before the work whose result goes there."""
    path = Path(path)
    if path.is_dir():
        raise OutputError("this output path is a folder, not a file.", where=str(path), hint="Name a file.")
    if path.exists() and not overwrite:
        raise OutputError("the output file exists.", where=str(path),
                          hint=f"Choose another name, or pass {flag} to overwrite it.")
    return path


def discard_dir(path: str | Path, *, require_marker: bool = True) -> None:
    """Remove a folder qingzhou wrote: first renamed aside (one atomic step, so no reader ever sees
    it half deleted), then deleted. Refuses a folder without qingzhou's marker unless the caller
    knows it by construction (`require_marker=False`: a checkpoint of its own, say)."""
    path = Path(path)
    if not path.exists():
        return
    if require_marker:
        check_output_dir(path, overwrite=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=".tmp", dir=path.parent))
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False, what: str = "") -> Iterator[Path]:
    """Yield a temp folder; on success it becomes `path` (with qingzhou's marker), on failure it is
    removed. Readers therefore see either the old folder, no folder, or the complete new one.

    An existing non-empty `path` is replaced only with `overwrite=True` and only if qingzhou wrote
    it (`check_output_dir`); the check runs when the new folder is complete, so callers that know
    their output path should call `check_output_dir` first as well.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    aside: Path | None = None
    swapped = False
    try:
        yield tmp
        _default_modes(tmp)
        write_marker(tmp, what)
        fault_point(f"commit {path.name}")
        if path.exists():
            check_output_dir(path, overwrite)
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=".tmp", dir=path.parent))
            os.replace(path, aside)
            fault_point(f"swap {path.name}")
            os.replace(tmp, path)
            swapped = True
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if aside is not None and not swapped:
            if path.exists():  # the old folder was never moved: drop the empty placeholder
                shutil.rmtree(aside, ignore_errors=True)
            else:  # interrupted between the two renames: put the old folder back
                os.replace(aside, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_path(path: str | Path, *, max_hashed: int = 32 << 20) -> str:
    """A content fingerprint of a file or folder, to notice changed inputs on `--resume`: sha256 of
    every file up to `max_hashed` bytes, name + size + mtime of larger ones (hashing GBs of weights
    would dominate a resume). Temp files and qingzhou's marker do not count."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return sha256_file(path) if st.st_size <= max_hashed else f"stat:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.endswith(".tmp"))
        for name in sorted(files):
            if name == MARKER or name.endswith(".tmp"):
                continue
            f = Path(root) / name
            h.update(f"{f.relative_to(path).as_posix()}\0{fingerprint_path(f, max_hashed=max_hashed)}\n".encode())
    return "tree:" + h.hexdigest()
