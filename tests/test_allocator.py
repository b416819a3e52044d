"""The process's malloc settings: applied at start-up, in spawned workers, off with EFFCIFAR_MALLOC=system.

Every check runs in a child process: malloc's settings are per process and cannot be undone.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from effcifar.hpo.study import HpoConfig, load_run, run_study

GLIBC = platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the settings are glibc's (a no-op elsewhere)")

# Allocates a 64 MiB tensor and reports what is in effect and how many bytes malloc served with mmap meanwhile.
PROBE = """
import ctypes, json, torch
from effcifar.allocator import configure_allocator
state = configure_allocator()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
before = libc.mallinfo2().hblkhd
block = torch.ones(16 << 20)
print(json.dumps({"state": state, "mmapped": libc.mallinfo2().hblkhd - before}))
"""


def probe(**env: str) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k not in ("EFFCIFAR_MALLOC", "GLIBC_TUNABLES")} | env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


@pytest.mark.slow
@needs_glibc
def test_tuned_by_default_large_tensors_come_from_the_heap():
    result = probe()
    assert result == {"state": "tuned", "mmapped": 0}


@pytest.mark.slow
@needs_glibc
def test_system_setting_leaves_glibc_alone():
    result = probe(EFFCIFAR_MALLOC="system")
    assert result["state"] == "system" and result["mmapped"] >= 64 << 20  # glibc maps a block this large itself


@pytest.mark.slow
@needs_glibc
def test_users_own_glibc_tunables_win():
    result = probe(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576")
    assert result["state"] == "environment" and result["mmapped"] >= 64 << 20  # their threshold, not ours


@pytest.mark.slow
def test_bad_value_is_a_one_line_error_naming_the_variable():
    run = subprocess.run([sys.executable, "-m", "effcifar", "supernet", "space"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, EFFCIFAR_MALLOC="fast"))
    assert run.returncode == 2
    assert run.stderr == "effcifar supernet: error: EFFCIFAR_MALLOC: expected one of tuned, system, got 'fast'\n"


@pytest.mark.slow
@needs_glibc
@pytest.mark.parametrize("setting", ["tuned", "system"])
def test_spawned_hpo_workers_apply_the_setting(tmp_path: Path, files, monkeypatch, setting):
    base, space = files
    monkeypatch.setenv("EFFCIFAR_MALLOC", setting)  # the workers inherit the environment, as from the CLI
    run_study(HpoConfig(space=str(space), base=str(base), trials=2, workers=2, sampler_seed=0), tmp_path / "hpo")
    trials = load_run(tmp_path / "hpo")[1].get_trials()
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2  # both ran in a spawned worker
    summaries = [json.loads((tmp_path / "hpo" / t.user_attrs["run_dir"] / "summary.json").read_text()) for t in trials]
    assert [s["malloc"] for s in summaries] == [setting, setting]
