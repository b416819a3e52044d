"""Study storage: a URL's password is hidden in the form SQLAlchemy connects with, in every message and file; a
journal cut mid-record (a full disk, a kill) is repaired by its next writer and refused by nobody; workers end
with their command."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from effcifar.cli import main
from effcifar.config import save_config
from effcifar.errors import ConfigError, DiskFull
from effcifar.hpo.study import HpoConfig
from effcifar.rundir import locked
from effcifar.studies import (
    JOURNAL, StorageConfig, check_setup, is_storage_url, load_study, open_storage, redact_text, redact_url, run_trials,
    spellings,
)

from conftest import TINY_BASE

SECRET = "123/SECRET?PW#x"


@pytest.mark.parametrize("url, redacted", [
    ("postgresql://alice:123/SECRETPW@localhost/x", "postgresql://alice@localhost/x"),
    ("postgresql://alice:p#SECRETPW?@db:5433/x", "postgresql://alice@db:5433/x"),
    ("postgresql+psycopg://alice@db/x?sslmode=require&PassWord=SECRETPW&sslpassword=SECRETPW",
     "postgresql+psycopg://alice@db/x?sslmode=require"),
    ("postgresql://alice:p%2FSECRETPW@db/x", "postgresql://alice@db/x"),
    ("mysql://alice:123/SECRETPW@db/x", "mysql://alice@db/x"),
    ("postgresql://alice:SECRETPW@db:notaport/x", "<not a URL>"),
    ("alice:SECRETPW", "<not a URL>"),
    ("postgresql://alice:SE@CRETPW@db:5432/x", "postgresql://alice@db:5432/x"),  # an unencoded '@' in it
])
def test_redaction_removes_the_password_sqlalchemy_would_send(url, redacted):
    assert redact_url(url) == redacted
    assert "SECRETPW" not in redact_text(f"failed for {url}", url)


def test_only_postgresql_urls_with_a_port_in_range_are_storage():
    assert is_storage_url("postgresql://alice:123/SECRETPW@localhost/x")
    assert not is_storage_url("postgresql://alice@localhost:99999/x")
    assert not is_storage_url("mysql://alice@localhost/x")
    assert not is_storage_url("postgresql://alice:SE@CRETPW@db/x")  # its tail would be sent as the host


@pytest.mark.parametrize("args", [
    ["hpo", "run", "--space", "examples/search_space.json", "--dataset", "synthetic", "--out", "{tmp}/run",
     "--storage"],
    ["hpo", "status", "{tmp}/saved", "--storage"],
    ["pipeline", "--show-config", "--set"],
])
@pytest.mark.parametrize("url", [
    f"postgresql://alice:{SECRET}@localhost:1/x",  # nothing listens on port 1: a connection error
    f"postgresql://alice:{SECRET}@localhost:99999/x",  # refused before connecting
    f"mysql://alice:{SECRET}@localhost/x",
])
def test_no_command_prints_a_password_with_url_delimiters(tmp_path, capsys, args, url):
    args = [a.format(tmp=tmp_path) for a in args]
    save_config(HpoConfig(space="examples/search_space.json", storage="postgresql://alice@localhost:1/x"),
                tmp_path / "saved" / "hpo.yaml")
    main([*args, f"hpo.storage={url}" if args[0] == "pipeline" else url])
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "alice" in printed
    assert not any(form in printed for form in spellings(SECRET) | {"SECRET"}), printed


def tiny_objective(study: optuna.Study):
    """One real trial without training: a suggestion, told back as its value."""
    return lambda trial: study.tell(trial, trial.suggest_float("x", 0, 1))


def journal_study(run_dir: Path, trials: int) -> optuna.Study:
    """A journal study in `run_dir` with `trials` finished trials, opened as its writer would (holding the lock)."""
    with locked(run_dir, "hpo"):
        study = optuna.create_study(storage=open_storage(StorageConfig(), run_dir), study_name="s", load_if_exists=True)
        run_trials(study, StorageConfig(), run_dir, trials, tiny_objective(study))
    return study


def is_whole(journal: Path) -> bool:
    return all(line.endswith(b"\n") and json.loads(line) for line in journal.read_bytes().splitlines(keepends=True))


def test_a_journal_cut_mid_record_resumes_losing_only_that_record(tmp_path, capsys):
    run = tmp_path / "run"
    journal_study(run, 3)
    journal = run / JOURNAL
    journal.write_bytes(journal.read_bytes()[:-20])  # the last record (trial 2 told COMPLETE) is cut
    reread = load_study(StorageConfig(study="s"), run)  # a reader skips the cut record
    assert [t.state for t in reread.get_trials()] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING]
    journal_study(run, 4)
    assert "dropped an incomplete last record (line" in capsys.readouterr().err
    assert is_whole(journal)
    states = [t.state for t in load_study(StorageConfig(study="s"), run).get_trials()]
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING, TrialState.COMPLETE]  # only trial 2's end lost


def test_a_damaged_record_inside_a_journal_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    journal_study(run, 2)
    lines = (run / JOURNAL).read_bytes().splitlines(keepends=True)
    (run / JOURNAL).write_bytes(b"".join([*lines[:2], lines[2][:-30] + lines[3], *lines[4:]]))
    with pytest.raises(ConfigError, match=rf"{run / JOURNAL}: line 3 of {len(lines) - 1} is not a valid journal"):
        load_study(StorageConfig(study="s"), run)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root; skipped where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_the_study_in_one_line_and_it_resumes_when_space_is_freed(small_disk, capsys):
    run = small_disk / "run"
    journal_study(run, 1)
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):  # fill the disk: only the journal's last page has room left
        while os.write(fd, b"\0" * 4096):
            pass
    os.close(fd)
    with pytest.raises(DiskFull, match=r"disk full \(No space left on device\); free some space"):
        journal_study(run, 10_000)
    assert not is_whole(run / JOURNAL)  # the record that did not fit was cut
    filler.unlink()
    journal_study(run, 3)
    assert is_whole(run / JOURNAL)
    study = load_study(StorageConfig(study="s"), run)
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) >= 3


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if int(fields["PPid"]) == pid:
                found.append(int(status.parent.name))
    return found


def is_running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped is not)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def poll(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_their_killed_command(tmp_path, files, sig):
    """SIGKILL: the kernel ends the workers. SIGTERM: the command stops them before it lets go of its lock, marks
    their trials failed and exits 130, with no trial left running."""
    base, space = files
    base.write_text(json.dumps({**TINY_BASE, "subset": 2048, "epochs": 50}))  # trials outlast the test
    proc = subprocess.Popen([sys.executable, "-m", "effcifar", "hpo", "run", "--space", str(space), "--config", str(base),
                             "--workers", "2", "--trials", "4", "--out", str(tmp_path / "hpo")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        def two_workers_started() -> bool:
            workers[:] = [p for p in children(proc.pid)
                          if "spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
            return len(workers) == 2 and (tmp_path / "hpo" / "trials").is_dir()
        assert poll(two_workers_started, 120), "the workers did not start"
        os.kill(proc.pid, sig)
        assert proc.wait(30) == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
        if sig == signal.SIGTERM:  # stopped, not left to the kernel: none alive when the command has ended
            assert not any(is_running(w) for w in workers), "the command ended before its workers"
            assert not (tmp_path / "hpo" / ".lock").exists()
            states = [t.state for t in load_study(StorageConfig(), tmp_path / "hpo").trials]
            assert TrialState.RUNNING not in states and TrialState.FAIL in states, states
        assert poll(lambda: not any(is_running(w) for w in workers), 5), "a worker outlived its command"
    finally:
        for pid in [proc.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


WORKER_AT_EXIT = """
import atexit, os, sys, time
from effcifar.errors import ConfigError
from effcifar.studies import _worker_main

def target(worker):
    def slow_exit():
        open(sys.argv[1], "w").close()
        time.sleep(10)
    atexit.register(slow_exit)
    raise ConfigError("this worker failed")

_worker_main(target, (), 0, os.getppid())
"""


def test_a_worker_stopped_while_it_exits_ends_without_a_traceback(tmp_path):
    """Its command stops every worker once one has failed; one already exiting ends quietly."""
    exiting = tmp_path / "exiting"
    proc = subprocess.Popen([sys.executable, "-c", WORKER_AT_EXIT, str(exiting)], stderr=subprocess.PIPE, text=True)
    try:
        assert poll(exiting.exists, 60), proc.communicate()
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert "Traceback" not in err and "error: this worker failed" in err, err
    assert proc.returncode == -signal.SIGTERM


def test_a_journal_lock_left_by_a_killed_writer_does_not_stall_the_next(tmp_path):
    run = tmp_path / "run"
    journal_study(run, 1)
    (run / f"{JOURNAL}.lock").symlink_to(run / "a-killed-writer")  # Optuna's lock, as a kill mid-append leaves it
    started = time.monotonic()
    journal_study(run, 2)
    assert time.monotonic() - started < 10  # Optuna would wait 30 s for the lock to go stale
    assert not (run / f"{JOURNAL}.lock").exists()


def test_a_study_whose_trials_all_failed_takes_new_settings_and_one_with_results_refuses_them(tmp_path):
    study = optuna.create_study(storage=open_storage(StorageConfig(), tmp_path), study_name="s")
    check_setup(study, "setup", {"batch_size": 5000}, "run", "base config")
    study.tell(study.ask(), state=TrialState.FAIL)  # every trial failed on the bad value: no result to protect
    check_setup(study, "setup", {"batch_size": 500}, "run", "base config")
    study.tell(study.ask(), 0.5)
    with pytest.raises(ConfigError, match=r"another base config \(batch_size changed\)"):
        check_setup(study, "setup", {"batch_size": 50}, "run", "base config")
