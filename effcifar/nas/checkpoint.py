"""Checkpoints of a supernet run: atomic files with a digest, every generator's state, stop on a signal.

A checkpoint holds everything the rest of a run depends on, so a run resumed from one ends
bitwise-identical to an uninterrupted run on CPU; a truncated or corrupt file is detected on
load and the previous checkpoint is used.
"""

from __future__ import annotations

import hashlib
import io
import random
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from effcifar.atomic import atomic_write

CHECKPOINT_MAGIC = b"EFFCIFAR-CKPT-1\n"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically write `state` with a header and SHA-256 digest, so corruption is detected on load."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    atomic_write(path, CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; ValueError if it is truncated or corrupt."""
    raw = path.read_bytes()
    head = len(CHECKPOINT_MAGIC)
    if raw[:head] != CHECKPOINT_MAGIC:
        raise ValueError("not an effcifar checkpoint (bad header)")
    digest, payload = raw[head:head + 32], raw[head + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    return sorted((run_dir / "checkpoints").glob("step_*.pt"), reverse=True)


def latest_checkpoint(run_dir: Path, map_location: str | torch.device,
                      warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest checkpoint that loads and verifies; bad ones are reported and skipped."""
    for path in checkpoint_files(run_dir):
        try:
            return read_checkpoint(path, map_location)
        except (ValueError, RuntimeError, OSError, EOFError) as e:
            warn(f"{path}: {e}; trying the previous checkpoint")
    return None


def rng_states(device: torch.device) -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Inverse of `rng_states`."""
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps (restores the old handlers on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
