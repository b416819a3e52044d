"""The process's own malloc settings: keep freed activation memory for the next batch.

glibc's malloc hands every block above its mmap threshold (32 MiB at most while it adapts it
itself) back to the kernel when it is freed, and shrinks its heap when the top is free. A
training step frees and re-allocates hundreds of MiB of activations, so with those defaults
the kernel unmaps them and zero-fills every page again on the next batch, as system time
(docs/benchmarks.md). `configure_allocator()` makes malloc keep that memory: every block comes
from the heap, and the heap is never trimmed. The price is resident memory: what a run freed
stays with the process, and the heap fragments (docs/training.md says how much).

Every effcifar process applies it at start-up: the command line (and so every `torchrun`
rank), and the HPO and search worker processes, which inherit the environment variable below.
It is a no-op where the C library is not glibc, and it leaves malloc alone when the user set
glibc's own malloc tunables (GLIBC_TUNABLES=glibc.malloc.*, MALLOC_*_): theirs win.
"""

from __future__ import annotations

import ctypes
import os

from effcifar.errors import ConfigError

ENV_VAR = "EFFCIFAR_MALLOC"
SETTINGS = ("tuned", "system")  # tuned: this module's settings (the default); system: the C library's own
# mallopt(3) parameters and the values we set.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TUNED = {
    M_MMAP_MAX: 0,  # never serve a request with its own mmap: big blocks come from the heap and stay there
    M_TRIM_THRESHOLD: -1,  # never give the top of the heap back (-1 turns trimming off)
}
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                    "MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST")


def allocator_setting() -> str:
    """The value of $EFFCIFAR_MALLOC ('tuned' when unset); ConfigError naming the variable for anything else."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "tuned"
    if value not in SETTINGS:
        raise ConfigError(f"{ENV_VAR}: expected one of {', '.join(SETTINGS)}, got {os.environ[ENV_VAR]!r}")
    return value


def user_set_malloc() -> bool:
    """Whether the environment already tunes glibc's malloc (GLIBC_TUNABLES glibc.malloc.*, MALLOC_*_)."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(name in os.environ for name in _USER_MALLOC_ENV)


_in_effect = "system"  # what configure_allocator() left in place in this process


def configure_allocator() -> str:
    """Apply $EFFCIFAR_MALLOC to this process; return what is in effect (see `allocator_in_effect`)."""
    global _in_effect
    setting = allocator_setting()
    if user_set_malloc():
        _in_effect = "environment"
    elif setting == "tuned" and (libc := _glibc()) is not None:
        applied = [libc.mallopt(param, value) == 1 for param, value in TUNED.items()]
        _in_effect = "tuned" if all(applied) else "system"
    return _in_effect


def allocator_in_effect() -> str:
    """'tuned' (our settings), 'environment' (the user's glibc tunables) or 'system' (the C library's defaults)."""
    return _in_effect


def _glibc() -> ctypes.CDLL | None:
    """The running glibc (for mallopt), or None with another C library (musl, macOS, Windows)."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return ctypes.CDLL(None)
