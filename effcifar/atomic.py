"""Atomic file writes: a temporary file in the target's directory, then os.replace.

A reader (or a run killed mid-write) sees either the old file or the new one, never half of it.
The temporary file is created like any new file (mode 0666 less the umask), flocked while it is
written, and the directory is fsynced after the rename so that the new name survives a crash. A
temporary file whose writer died (no flock on it any more) is removed by the next write into its
directory. A full disk is a one-line `WriteError` naming the path, and the previous file stays.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, BinaryIO

import torch

from effcifar.errors import DiskFull, WriteError

TEMP_SUFFIX = ".effcifar-tmp"
STALE_AFTER = 5.0  # seconds since its last write before an unlocked temporary file counts as left behind
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota, file-size limit (ulimit -f)


def atomic_write_with(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path.parent)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # the umask applies
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # held until the rename: the file is not left behind
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, content: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    data = content.encode() if isinstance(content, str) else content
    atomic_write_with(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` atomically (load it back with weights_only=True).

    Serialised in memory first: torch.save reports a failed write as a RuntimeError without its
    cause, and a full disk must be told apart.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def write_error(path: Path, error: OSError) -> WriteError:
    """The one-line error of a failed write; the previous file at `path`, if any, is untouched."""
    if error.errno in DISK_FULL:
        return DiskFull(f"{path}: disk full ({error.strerror}); the previous file, if any, is kept")
    return WriteError(f"{path}: cannot write ({error.strerror or error})")


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: Path) -> None:
    """Remove the temporary files that writers which died left in `directory` (unlocked and not written lately)."""
    now = time.time()
    for tmp in directory.glob(f".*{TEMP_SUFFIX}"):
        try:
            if now - tmp.stat().st_mtime < STALE_AFTER:  # its writer may not have taken its lock yet
                continue
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # renamed or removed meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            tmp.unlink(missing_ok=True)
        except BlockingIOError:  # a live writer holds it
            pass
        finally:
            os.close(fd)
