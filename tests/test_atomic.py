"""Atomic writes as a crash, a full disk or a shared directory meet them: real processes, signals and limits."""

import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from effcifar.atomic import TEMP_SUFFIX, atomic_write
from effcifar.errors import WriteError


def python(code: str, **kwargs) -> subprocess.Popen:
    """A child Python running `code` (dedented), with pipes."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


# A writer that writes half of its content, says so, and waits to be killed.
SLOW_WRITER = """
    import sys, time
    from effcifar.atomic import atomic_write_with

    def write(f):
        f.write(b"new " * 1000)
        f.flush()
        print("half written", flush=True)
        time.sleep(60)

    atomic_write_with(sys.argv[1], write)
"""


def start_slow_writer(path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_WRITER), str(path)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "half written"
    return process


def temp_files(directory):
    return sorted(p.name for p in directory.glob(f".*{TEMP_SUFFIX}"))


def age(path, seconds=60):
    """Pretend the file was last written `seconds` ago."""
    past = time.time() - seconds
    os.utime(path, (past, past))


@pytest.mark.slow
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_follow_the_umask(tmp_path, umask, mode):
    path = tmp_path / "summary.json"
    r = python(f"""
        import os
        os.umask({umask})
        from effcifar.atomic import atomic_write
        atomic_write({str(path)!r}, "{{}}")
    """)
    assert r.wait(timeout=60) == 0, r.stderr.read()
    assert stat.S_IMODE(path.stat().st_mode) == mode


@pytest.mark.slow
def test_kill_9_mid_write_keeps_the_old_file_and_the_next_write_clears_the_temp_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    writer = start_slow_writer(path)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert path.read_bytes() == b"old"  # readable and whole
    (left,) = temp_files(tmp_path)
    atomic_write(tmp_path / "logs.tsv", "epoch\n")  # too recent: its writer may still be starting
    assert temp_files(tmp_path) == [left]
    age(tmp_path / left)
    atomic_write(tmp_path / "logs.tsv", "epoch\n")
    assert temp_files(tmp_path) == []
    assert path.read_bytes() == b"old"


@pytest.mark.slow
def test_the_temp_file_of_a_live_writer_is_kept(tmp_path):
    path = tmp_path / "model.pt"
    writer = start_slow_writer(path)
    try:
        (busy,) = temp_files(tmp_path)
        age(tmp_path / busy)
        atomic_write(tmp_path / "other.json", "{}")
        assert temp_files(tmp_path) == [busy]  # flocked by its writer
    finally:
        writer.kill()
        writer.wait()


def limit_file_size(size: int):
    """preexec_fn: writes past `size` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.mark.slow
def test_file_size_limit_keeps_the_previous_file_and_says_disk_full(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from effcifar.atomic import atomic_write
        from effcifar.errors import WriteError
        try:
            atomic_write({str(path)!r}, b"x" * 100_000)
        except WriteError as e:
            print(e)
    """)], capture_output=True, text=True, timeout=60, preexec_fn=limit_file_size(50_000))
    assert r.returncode == 0, r.stderr
    assert f"{path}: disk full (File too large)" in r.stdout
    assert path.read_bytes() == b"previous" and temp_files(tmp_path) == []


@pytest.mark.slow
def test_a_full_tmpfs_keeps_the_previous_file(tmp_path):
    """A real full filesystem: a 64 KiB tmpfs in a private mount namespace (skipped where one cannot be made)."""
    mount = tmp_path / "small"
    mount.mkdir()
    inner = textwrap.dedent(f"""
        import subprocess
        from pathlib import Path
        from effcifar.atomic import TEMP_SUFFIX, atomic_write
        from effcifar.errors import WriteError
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", {str(mount)!r}], check=True)
        path = Path({str(mount)!r}) / "model.pt"
        atomic_write(path, b"previous")
        try:
            atomic_write(path, b"x" * 200_000)
        except WriteError as e:
            print(e)
        print(path.read_bytes().decode(), len(list(path.parent.glob("*" + TEMP_SUFFIX))))
    """)
    r = subprocess.run(["unshare", "--map-root-user", "--mount", sys.executable, "-c", inner],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and ("mount" in r.stderr or "unshare" in r.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    error, state = r.stdout.strip().splitlines()
    assert error == f"{mount / 'model.pt'}: disk full (No space left on device); the previous file, if any, is kept"
    assert state == "previous 0"


def test_a_write_into_a_missing_place_is_a_write_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WriteError, match=f"{blocker / 'x.json'}: cannot write"):
        atomic_write(blocker / "x.json", "{}")
