"""One writer per run directory: an exclusive flock on RUN/.lock, which the kernel releases when its holder dies.

Every command that writes a run directory holds its lock while it runs (`locked`); a second one is
refused with a one-line `WriteError` naming the holder's process id, and commands that only read
take no lock. A process may lock again a directory it holds (a pipeline stage whose trainer locks
the stage's directory too). The lock file is removed when the lock is released (a killed holder
leaves it behind, unlocked), and a directory that `locked` created and that holds no file then (the
command failed before writing anything) is removed too, so a refused input leaves nothing behind.

Each run directory records its kind (train, hpo, supernet, ...) in RUN/.kind when first locked, and
a command of another kind is refused, so that no command replaces another's files. A pipeline's
stages are directories of their own kinds inside it; a command that writes into one also takes the
pipeline's lock, so it is refused while the pipeline runs (and the pipeline while it runs). Any
directory inside a run that another command is writing is that command's (a study's trials): only
it and its worker processes may lock one. Directories made before kinds were recorded take the kind of the next command that locks them.
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
KIND_FILE = ".kind"
REPLACED_DIR = ".replaced"  # a run being replaced (`replacing`), kept until its replacement has succeeded
KINDS = ("train", "hpo", "supernet", "search", "select", "retrain", "nas-eval", "report", "pipeline")
_held: dict[Path, int] = {}  # directories this process holds -> how many `locked` blocks hold them


@contextlib.contextmanager
def locked(directory: str | Path, kind: str) -> Iterator[Path]:
    """Hold the run directory's lock (creating the directory) for the block, as a run of `kind`.

    WriteError if another process has it, if it is a run of another kind, or if it is a stage of a
    pipeline that another process runs.
    """
    directory = Path(directory)
    key = directory.resolve()
    if key in _held:
        _held[key] += 1
        try:
            check_kind(directory, kind)
            yield directory
        finally:
            _held[key] -= 1
        return
    check_enclosing_runs(directory)
    parent = directory.parent
    if recorded_kind(parent) == "pipeline" and parent.resolve() not in _held:
        with locked(parent, "pipeline"), locked(directory, kind):  # one writer for the pipeline and its stages
            yield directory
        return
    created = first_missing(directory)
    fd = acquire(directory)
    _held[key] = 1
    before, recorded = files(directory), False
    try:
        recorded = check_kind(directory, kind)
        yield directory
    finally:
        del _held[key]
        after = files(directory)
        if recorded and after == before:  # a command that wrote nothing (refused) leaves the directory as it was
            (directory / KIND_FILE).unlink(missing_ok=True)
        (directory / LOCK_FILE).unlink(missing_ok=True)  # before the release: a waiter then sees it is gone
        os.close(fd)
        if created is not None and not after:
            remove_created(directory, created)


def check_enclosing_runs(directory: Path) -> None:
    """WriteError if a run directory around `directory` is being written by another command: a study's trial,
    a pipeline's stage and the like belong to the command that runs them (this process or its workers may)."""
    for folder in directory.resolve().parents:
        if folder in _held or not (folder / LOCK_FILE).is_file():
            continue
        holder = lock_holder(folder)
        if holder is not None and holder not in process_ancestors():
            raise WriteError(f"{directory} is inside {folder}, which another effcifar process (PID {holder}) is "
                             f"writing; wait for it to end or choose another run directory")


def lock_holder(directory: Path) -> int | None:
    """The id of the process holding the run directory's lock now (None: nobody; -1: a holder not yet named)."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = holder_pid(fd)
        return int(text) if text.isdigit() else -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def process_ancestors() -> set[int]:
    """This process and its parents (read from /proc where there is one, else the parent alone)."""
    found, pid = {os.getpid()}, os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rpartition(")")[2].split()[1])  # the field after the state; the name may hold spaces
    return found


def files(directory: Path) -> set[tuple[Path, int, int, int]]:
    """(path, inode, size, modification time) of the files in a run directory at any depth, but for its lock and
    kind: what tells whether a command wrote anything (an atomic write makes a new inode)."""
    found = set()
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):  # removed meanwhile
            if path.is_file() and path.name not in (LOCK_FILE, KIND_FILE):
                stat = path.stat()
                found.add((path, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return found


def recorded_kind(directory: Path) -> str | None:
    """The kind of run a directory records (None: not a run directory, or one made before kinds were recorded)."""
    try:
        return (directory / KIND_FILE).read_text(errors="replace").strip() or None
    except OSError:
        return None


def check_kind(directory: Path, kind: str) -> bool:
    """Refuse a directory that records another kind of run; record `kind` in one that records none (True)."""
    recorded = recorded_kind(directory)
    if recorded is None:
        from effcifar.atomic import atomic_write  # torch: only for the commands that write a run

        atomic_write(directory / KIND_FILE, f"{kind}\n")
        return True
    if recorded != kind:
        shown = recorded if recorded in KINDS else "another kind of"
        raise WriteError(f"{directory} is {'an' if shown[0] in 'aehi' else 'a'} {shown} run, not a {kind} run; "
                         f"choose another --out")
    return False


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


def remove_created(directory: Path, created: Path) -> None:
    """Remove a run directory that `locked` created and nothing was written to, and the folders it created above
    it while they are empty: another command may have put its own run beside it meanwhile."""
    shutil.rmtree(directory, ignore_errors=True)
    for folder in directory.parents:
        if not folder.is_relative_to(created):
            break
        try:
            folder.rmdir()  # only when empty
        except OSError:
            break


@contextlib.contextmanager
def replacing(directory: Path) -> Iterator[None]:
    """Replace the run in a directory this process holds, keeping the old one until the block has succeeded.

    Its files move aside into RUN/.replaced (renames: no space needed) and come back if the block
    fails (a full disk, a diverged run, Ctrl-C); they are removed once it succeeds. A replacement
    killed midway leaves them there, and the next `replacing` first puts them back.
    """
    aside = directory / REPLACED_DIR
    if aside.is_dir():
        _put_back(directory, aside)
    aside.mkdir()
    for path in _run_files(directory):
        path.rename(aside / path.name)
    try:
        yield
    except BaseException:
        _put_back(directory, aside)
        raise
    shutil.rmtree(aside)


def _run_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name not in (LOCK_FILE, KIND_FILE, REPLACED_DIR)]


def _put_back(directory: Path, aside: Path) -> None:
    """Remove what a failed replacement wrote and move the replaced run back."""
    for path in _run_files(directory):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for path in aside.iterdir():
        path.rename(directory / path.name)
    aside.rmdir()


def clear(directory: Path) -> None:
    """Remove everything in a run directory this process holds, except its lock."""
    for path in directory.iterdir():
        if path.name in (LOCK_FILE, KIND_FILE):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
