"""Atomic file writes: a temporary file in the target's directory, then os.replace.

A reader (or a run killed mid-write) sees either the old file or the new one, never half of it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, BinaryIO

import torch


def atomic_write_with(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, content: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    data = content.encode() if isinstance(content, str) else content
    atomic_write_with(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` atomically (load it back with weights_only=True)."""
    atomic_write_with(path, lambda f: torch.save(obj, f))
