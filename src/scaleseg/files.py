"""Atomic file writes, and a full disk reported as one line naming the file.

Every output of scaleseg (checkpoints, weights, configs, metrics, PNGs) is written to a temporary
file next to its target, flushed to disk, then renamed onto it: a crash or kill never leaves half a
file under the real name. A write that fails because the device is full (``ENOSPC``), over quota
(``EDQUOT``) or over the file size limit (``EFBIG``) raises :class:`DiskFullError` naming the target
and the free space; any temporary file is removed.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import DiskFullError

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_OS_ERROR_CODE = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors) report errno
# temporary names: ".<name>.tmp<pid>-<hex8>" (and ".<name>.tmp<pid>" of older versions)
TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)(-[0-9a-f]{8})?$")


def temp_path(path: Path) -> Path:
    """A unique temporary name next to ``path`` that :data:`TEMP_NAME` recognises (pid first)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")


def error_errno(err: BaseException) -> int | None:
    """The errno of an OSError, or the one a Rust library wrote into its message."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    found = _OS_ERROR_CODE.search(str(err))
    return int(found.group(1)) if found else None


def free_space(path: Path) -> int | None:
    """Free bytes on the device holding ``path`` (or its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def disk_full_error(err: BaseException, path: str | Path) -> DiskFullError | None:
    """A one-line DiskFullError for ``err`` while writing ``path``, or None if ``err`` is another fault."""
    code = error_errno(err)
    if code not in DISK_FULL_ERRNOS:
        return None
    what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file size limit exceeded"}[code]
    free = free_space(Path(path).parent)
    room = f" ({format_bytes(free)} free there)" if free is not None else ""
    return DiskFullError(f"{what} while writing {path}{room}; free some space or write to another disk")


def _atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise disk_full_error(err, path) or err
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(err, path) if isinstance(err, Exception) else None
        if full is not None:
            raise full from None
        raise
    return path


class _WholeWrites:
    """A file object whose ``write`` writes everything or raises the OSError (e.g. ENOSPC). A short
    write (the disk filled up mid-buffer) would otherwise reach torch's zip writer as a bare count
    mismatch ("unexpected pos ... inline_container.cc") instead of the errno. Everything else is the
    real file's, except ``fileno``: writers that would use it (Pillow) go through ``write`` too."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self.error: OSError | None = None  # torch's C++ writer swallows it: kept to re-raise

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                n = self._fh.write(view[done:])
                if not n:
                    raise OSError(errno.EIO, "write made no progress")
                done += n
        except OSError as err:
            self.error = err
            raise
        return done

    def __getattr__(self, name: str) -> object:  # read, seek, tell, flush, ... of the real file
        if name == "fileno":
            raise AttributeError(name)
        return getattr(self._fh, name)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temporary file next to ``path``, fsync, then rename it onto ``path``.
    Parent folders are created. Returns ``path``."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "xb", buffering=0) as fh:  # created with the usual umask permissions
            whole = _WholeWrites(fh)
            try:
                write(whole)  # type: ignore[arg-type]
            except Exception:
                if whole.error is not None:
                    raise whole.error from None
                raise
            os.fsync(fh.fileno())

    return _atomic(path, to_file)


def atomic_write_path(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Like :func:`atomic_write` for writers that take a file name (``write(tmp_path)``)."""
    return _atomic(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files (:data:`TEMP_NAME`) under ``folder`` left by killed writers (any but
    this process's own). Call only while holding the folder's run lock: then no other process writes there."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp*"):
        found = TEMP_NAME.match(path.name)
        if found and path.is_file() and int(found.group(1)) != os.getpid():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
