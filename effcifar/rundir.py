"""One writer per run directory: an exclusive flock on RUN/.lock, which the kernel releases when its holder dies.

Every command that writes a run directory holds its lock while it runs (`locked`); a second one is
refused with a one-line `WriteError` naming the holder's process id, and commands that only read
take no lock. A process may lock again a directory it holds (a pipeline stage whose trainer locks
the stage's directory too). The lock file is removed when the lock is released (a killed holder
leaves it behind, unlocked), and a directory that `locked` created and that holds no file then (the
command failed before writing anything) is removed too, so a refused input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from effcifar.errors import WriteError

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # directories this process holds -> how many `locked` blocks hold them


@contextlib.contextmanager
def locked(directory: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock (creating the directory) for the block; WriteError if another process has it."""
    directory = Path(directory)
    key = directory.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield directory
        finally:
            _held[key] -= 1
        return
    created = first_missing(directory)
    fd = acquire(directory)
    _held[key] = 1
    try:
        yield directory
    finally:
        del _held[key]
        (directory / LOCK_FILE).unlink(missing_ok=True)  # before the release: a waiter then sees it is gone
        os.close(fd)
        if created is not None and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created, ignore_errors=True)


def holds(directory: str | Path) -> bool:
    """Whether this process holds the run directory's lock (so that no other effcifar process writes it)."""
    return Path(directory).resolve() in _held


def acquire(directory: Path) -> int:
    """Create the directory and take its lock without waiting; the descriptor that holds it."""
    if directory.exists() and not directory.is_dir():
        raise WriteError(f"{directory}: expected a run directory, got a file")
    path = directory / LOCK_FILE
    while True:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise WriteError(f"{directory}: cannot create the run directory or its lock ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_pid(fd)
            os.close(fd)
            raise WriteError(f"{directory}: in use by another effcifar process (PID {holder}); wait for it to end "
                             f"or choose another run directory") from None
        if is_same_file(fd, path):
            break
        os.close(fd)  # its holder removed it between our open and our lock: lock the file there now
    with contextlib.suppress(OSError):  # the id only names the holder to a refused process: a full disk may lack room
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def is_same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path`."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def holder_pid(fd: int) -> str:
    """The process id the lock's holder wrote (it writes it right after locking: wait a moment for it)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "unknown"


def first_missing(directory: Path) -> Path | None:
    """The outermost directory on the way to `directory` that does not exist yet (None if it exists)."""
    missing = None
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing = path
    return missing


def clear(directory: Path) -> None:
    """Remove everything in a run directory this process holds, except its lock."""
    for path in directory.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
