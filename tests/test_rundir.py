"""One writer per run directory: real processes hold the lock, are refused, and are killed with signals."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from effcifar.errors import WriteError
from effcifar.rundir import LOCK_FILE, locked

from test_cli import TINY, effcifar

# A process that holds the lock of a directory until it is killed.
HOLDER = """
    import sys, time
    from effcifar.rundir import locked
    with locked(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """(directory, process holding its lock)."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(run)], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "locked"
    yield run, process
    process.kill()
    process.wait()


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder(holder):
    run, process = holder
    with pytest.raises(WriteError, match=rf"^{run}: in use by another effcifar process \(PID {process.pid}\)"):
        with locked(run):
            pass
    assert (run / LOCK_FILE).is_file()  # the refused writer took nothing away


@pytest.mark.slow
def test_kill_9_releases_the_lock(holder):
    run, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run / LOCK_FILE).read_text().strip() == str(process.pid)  # left behind, but no longer held
    with locked(run):
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (run / LOCK_FILE).exists()


@pytest.mark.slow
def test_train_on_a_directory_in_use_is_one_line_and_touches_nothing(holder):
    run, process = holder
    (run / "logs.tsv").write_text("theirs")
    r = effcifar("train", *TINY, "--out", str(run), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"{run}: in use by another effcifar process (PID {process.pid})" in r.stderr
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "logs.tsv"] and (run / "logs.tsv").read_text() == "theirs"


def test_a_process_may_lock_a_directory_it_holds(tmp_path):
    with locked(tmp_path / "run"):
        with locked(tmp_path / "run"):
            (tmp_path / "run" / "a").write_text("")
        assert (tmp_path / "run" / LOCK_FILE).is_file()  # still held by the outer block
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_directory_left_empty_by_a_failure_is_removed_and_an_existing_one_kept(tmp_path):
    with pytest.raises(ValueError):
        with locked(tmp_path / "new" / "run"):
            raise ValueError("refused before writing anything")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with locked(tmp_path / "old"):
        pass
    assert (tmp_path / "old").is_dir() and not any((tmp_path / "old").iterdir())


def test_a_file_in_place_of_the_directory_is_refused(tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(WriteError, match="taken: expected a run directory, got a file"):
        with locked(tmp_path / "taken"):
            pass
    assert (tmp_path / "taken").read_text() == "mine"
