"""Run a command as a child process and measure it: wall time, and the child's own CPU and system time and
peak resident memory (wait4), which a process-wide malloc setting changes and an in-process timer does not see.

Shared by the benchmarks that measure whole processes (train_step, pipeline); and the variant syntax of the
benchmarks that compare configurations side by side (nas_bench_macro, gpu/compare).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# Tunables set from outside: malloc keeps blocks up to 1 GiB and never trims below 1 GiB.
OUTSIDE_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"
VARIANTS = ("ours", "ours-system", "ours-tunables", "main")  # see variant_env


@dataclass
class Measured:
    """What one child process took."""

    wall: float  # seconds
    user: float  # CPU seconds in user mode, all threads
    sys: float  # CPU seconds in the kernel (page faults, mmap/munmap), all threads
    rss_mb: float  # peak resident memory, MiB


def run_measured(command: list[str], log: Path, env: dict[str, str] | None = None) -> Measured:
    """Run `command` with its output in `log`; SystemExit with the log's end if it fails."""
    start = time.perf_counter()
    with open(log, "w") as sink:
        child = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    if child.returncode:
        raise SystemExit(f"{' '.join(command)}: exit {child.returncode}\n{log.read_text()[-3000:]}")
    return Measured(time.perf_counter() - start, usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024)


def variant_env(variant: str, main_src: str | None = None) -> dict[str, str]:
    """The environment of an effcifar variant: 'ours' (as a user runs it), 'ours-system' (EFFCIFAR_MALLOC=system),
    'ours-tunables' (OUTSIDE_TUNABLES in GLIBC_TUNABLES) or 'main' (the effcifar source tree `main_src`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("EFFCIFAR_MALLOC", "GLIBC_TUNABLES", "PYTHONPATH")}
    if variant == "main" and not main_src:
        raise SystemExit("the variant 'main' needs --main-src (a source tree, e.g. from `git archive main`)")
    extra = {"ours-system": {"EFFCIFAR_MALLOC": "system"}, "ours-tunables": {"GLIBC_TUNABLES": OUTSIDE_TUNABLES},
             "main": {"PYTHONPATH": str(main_src)}}
    return env | extra.get(variant, {})


def parse_assignment(text: str) -> tuple[str, str]:
    """FIELD=VALUE as a pair; argparse turns the error into a one-line usage message."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return field, value


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """NAME or NAME:FIELD=VALUE,FIELD=VALUE."""
    name, _, fields = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:FIELD=VALUE,..., got {text!r}")
    return name, dict(parse_assignment(item) for item in fields.split(",") if item)
