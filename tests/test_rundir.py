"""One writer per run directory: real processes hold the lock, are refused, and are killed with signals."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from effcifar.cli import main
from effcifar.errors import WriteError
from effcifar.rundir import KIND_FILE, LOCK_FILE, REPLACED_DIR, locked, replacing

from test_cli import TINY, effcifar

# A process that holds the lock of a directory until it is killed.
HOLDER = """
    import sys, time
    from effcifar.rundir import locked
    with locked(sys.argv[1], sys.argv[2]):
        print("locked", flush=True)
        time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path, request):
    """(directory, process holding its lock as a run of the kind the test's parameter names, default train)."""
    run = tmp_path / "run"
    kind = getattr(request, "param", "train")
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(run), kind], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "locked"
    yield run, process
    process.kill()
    process.wait()


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder(holder):
    run, process = holder
    with pytest.raises(WriteError, match=rf"^{run}: in use by another effcifar process \(PID {process.pid}\)"):
        with locked(run, "train"):
            pass
    assert (run / LOCK_FILE).is_file()  # the refused writer took nothing away


@pytest.mark.slow
def test_kill_9_releases_the_lock(holder):
    run, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run / LOCK_FILE).read_text().strip() == str(process.pid)  # left behind, but no longer held
    with locked(run, "train"):
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (run / LOCK_FILE).exists()


@pytest.mark.slow
def test_train_on_a_directory_in_use_is_one_line_and_touches_nothing(holder):
    run, process = holder
    (run / "logs.tsv").write_text("theirs")
    r = effcifar("train", *TINY, "--out", str(run), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"{run}: in use by another effcifar process (PID {process.pid})" in r.stderr
    assert sorted(p.name for p in run.iterdir()) == [KIND_FILE, LOCK_FILE, "logs.tsv"] and (run / "logs.tsv").read_text() == "theirs"


@pytest.mark.slow
@pytest.mark.parametrize("holder", ["hpo"], indirect=True)
def test_a_directory_inside_a_run_another_command_writes_is_refused(holder):
    """A running study's trial folder belongs to it: another command may not lock it (nor replace its files)."""
    run, process = holder
    trial = run / "trials" / "0000"
    with pytest.raises(WriteError, match=rf"^{trial} is inside {run}, which another effcifar process "
                                         rf"\(PID {process.pid}\) is writing"):
        with locked(trial, "train"):
            pass
    r = effcifar("train", *TINY, "--out", str(trial), "--overwrite", "--quiet")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "is inside" in r.stderr, r.stderr
    assert not (run / "trials").exists()  # nothing left behind
    process.kill()
    process.wait()
    with locked(trial, "train"):  # once it has ended, the folder is free
        pass


def test_a_process_may_lock_a_directory_it_holds(tmp_path):
    with locked(tmp_path / "run", "train"):
        with locked(tmp_path / "run", "train"):
            (tmp_path / "run" / "a").write_text("")
        assert (tmp_path / "run" / LOCK_FILE).is_file()  # still held by the outer block
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_directory_left_empty_by_a_failure_is_removed_and_an_existing_one_kept(tmp_path):
    with pytest.raises(ValueError):
        with locked(tmp_path / "new" / "run", "train"):
            raise ValueError("refused before writing anything")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with locked(tmp_path / "old", "train"):
        pass
    assert (tmp_path / "old").is_dir() and not any((tmp_path / "old").iterdir())


def test_a_failure_removes_only_its_own_directory_not_a_run_made_beside_it_meanwhile(tmp_path):
    with pytest.raises(ValueError):
        with locked(tmp_path / "new" / "a", "train"):  # creates new/ and new/a/
            (tmp_path / "new" / "b").mkdir()  # another command's run, made while this one runs
            (tmp_path / "new" / "b" / "summary.json").write_text("theirs")
            raise ValueError("refused before writing anything")
    assert not (tmp_path / "new" / "a").exists() and (tmp_path / "new" / "b" / "summary.json").read_text() == "theirs"


def test_a_replaced_run_is_kept_until_its_replacement_succeeds(tmp_path):
    run = tmp_path / "run"
    with locked(run, "train"):
        (run / "model.pt").write_text("old")
        with pytest.raises(OSError):
            with replacing(run):
                assert not (run / "model.pt").exists()
                (run / "logs.tsv").write_text("new, half written")
                raise OSError(28, "No space left on device")
        assert sorted(p.name for p in run.iterdir()) == [KIND_FILE, LOCK_FILE, "model.pt"]
        assert (run / "model.pt").read_text() == "old"
        (run / REPLACED_DIR).mkdir()  # a replacement killed midway: the old run aside, half a new one in place
        (run / "model.pt").rename(run / REPLACED_DIR / "model.pt")
        (run / "logs.tsv").write_text("new, half written")
        with replacing(run):
            (run / "model.pt").write_text("new")
        assert sorted(p.name for p in run.iterdir()) == [KIND_FILE, LOCK_FILE, "model.pt"]
        assert (run / "model.pt").read_text() == "new"


def test_a_file_in_place_of_the_directory_is_refused(tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(WriteError, match="taken: expected a run directory, got a file"):
        with locked(tmp_path / "taken", "train"):
            pass
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("kind, command", [
    ("supernet", ["train", *TINY]),
    ("hpo", ["train", *TINY]),
    ("train", ["supernet", "train", "--dataset", "synthetic"]),
    ("pipeline", ["hpo", "run", "--space", "examples/search_space.json", "--dataset", "synthetic"]),
])
def test_a_run_directory_of_another_kind_is_refused_and_kept(tmp_path, capsys, kind, command):
    run = tmp_path / "run"
    with locked(run, kind):
        (run / "theirs.txt").write_text("theirs")
    assert main([*command, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{run} is a" in err and f" {kind} run, not a" in err, err
    assert sorted(p.name for p in run.iterdir()) == [KIND_FILE, "theirs.txt"]


def test_a_directory_from_before_kinds_takes_the_kind_of_its_next_command(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "logs.tsv").write_text("old")
    with locked(run, "train"):
        (run / "logs.tsv").write_text("newer")
    with pytest.raises(WriteError, match="is a train run, not a supernet run; choose another --out"):
        with locked(run, "supernet"):
            pass


@pytest.mark.parametrize("holder", ["pipeline"], indirect=True)
def test_a_stage_directory_of_a_running_pipeline_is_refused(holder, capsys):
    pipeline, process = holder
    (pipeline / "baseline").mkdir()  # a finished stage
    (pipeline / "baseline" / KIND_FILE).write_text("train\n")
    (pipeline / "baseline" / "summary.json").write_text("{}")
    assert main(["train", *TINY, "--out", str(pipeline / "baseline")]) == 2
    err = capsys.readouterr().err
    assert f"is inside {pipeline}, which another effcifar process (PID {process.pid}) is writing" in err, err
    assert (pipeline / "baseline" / "summary.json").read_text() == "{}"


@pytest.mark.slow
def test_sigterm_stops_a_training_run_like_ctrl_c(tmp_path):
    run = tmp_path / "run"
    long = [a if a != "1" else "50" for a in TINY]  # --epochs 50: still training when the signal comes
    process = subprocess.Popen([sys.executable, "-m", "effcifar", "train", *long, "--out", str(run), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "logs.tsv").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130 and stderr.strip() == "effcifar train: terminated", stderr
    assert not (run / LOCK_FILE).exists()
