"""Budgeted Optuna studies shared by workers: storage, budget, the worker loop, heartbeats, lost trials.

HPO (`effcifar.hpo.study`) and architecture search (`effcifar.nas.search`) are both a study whose
trials are run by one or more worker processes, on one machine (a journal file in the run
directory) or several (one PostgreSQL database). This module is that machinery, once:

- `StorageConfig`: the config part that says where the study lives (`storage`, `heartbeat`, `study`),
  and `redact_url`, the one redaction of a storage URL's password wherever one is saved or shown;
- `open_storage`: the journal, or PostgreSQL with heartbeats and Optuna's retry of stale trials;
  `load_study` opens an existing study read-only (it never creates a file, a table or a study);
- `study_name`: the study of a run directory (recorded in it, so a renamed or copied one keeps it);
  `check_setup`: a resumed study must have been made with the same settings;
- `run_trials`: the worker loop. Under a lock it fails the trials of dead workers (re-queuing each),
  counts the budget (finished trials, across restarts, a retried trial counted once), reseeds the
  sampler by the trial's position and asks; then it runs the trial with a heartbeat;
- `start_workers`: worker processes, each pinned to a GPU, and a report of every finished trial.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from effcifar.allocator import configure_allocator
from effcifar.atomic import DISK_FULL
from effcifar.config import build_config, changed_fields, check_types, execution, field_error, fingerprint, setting
from effcifar.errors import ConfigError, DiskFull, EffcifarError
from effcifar.rundir import holds

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_RETRY = 3  # PostgreSQL: retries of a trial whose worker went silent
OnTrial = Callable[[FrozenTrial], None]
S = TypeVar("S", bound="StorageConfig")


@dataclass
class StorageConfig:
    """Where a study lives; the config part shared by HPO and search studies."""

    storage: str | None = execution(None, "postgresql://USER@HOST/DB shared by several machines (password: "
                                          "PGPASSWORD or ~/.pgpass; never printed); default: a journal file in the "
                                          "run directory")
    heartbeat: float = execution(10.0, "seconds between worker heartbeats (PostgreSQL): a trial silent for 3 is "
                                       "failed and retried")
    study: str | None = setting(None, "study name (default: the one recorded in the run directory, else its name)")

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for a bad storage URL or heartbeat."""
        check_types(self)
        if self.storage is not None and not is_storage_url(self.storage):
            raise field_error("storage", "a postgresql://USER@HOST[:PORT]/DB URL (an '@' in a password written "
                                         "%40)", redact_url(self.storage))
        if not self.heartbeat >= 1:
            raise field_error("heartbeat", "a number of seconds >= 1", self.heartbeat)

    def without_password(self: S) -> S:
        """This config with the storage URL's password removed, to save or show."""
        return self if self.storage is None else dataclasses.replace(self, storage=redact_url(self.storage))


STORAGE_SCHEMES = ("postgresql", "postgresql+psycopg")
JOURNAL = "study.journal"
JOURNAL_LOCK = JOURNAL + ".lock"  # Optuna's JournalFileSymlinkLock, held while a record is appended


def parse_url(url: str) -> sqlalchemy.engine.URL | None:
    """`url` as SQLAlchemy parses it to connect (None if it does not parse): the one parser for checking,
    connecting and redacting, so that what is hidden is what would be sent as the password."""
    try:
        return sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        return None


def is_storage_url(url: str) -> bool:
    """Whether `url` is a PostgreSQL URL whose parts parse (a port, if given, is a number 0-65535)."""
    parsed = parse_url(url)
    return (parsed is not None and parsed.drivername in STORAGE_SCHEMES and 0 <= (parsed.port or 0) <= 65535
            and "@" not in (parsed.host or ""))  # else the password held an '@': its tail would be the host


def is_password_key(name: str) -> bool:
    """A URL query parameter that carries a password (libpq's `password`, `sslpassword`; any case or encoding)."""
    return "password" in urllib.parse.unquote_plus(name).lower()


def _redacted(url: str) -> tuple[str, list[str]]:
    """(the URL without its passwords, every password it holds, decoded)."""
    parsed = parse_url(url)
    if parsed is None:
        return "<not a URL>", [url]
    keys = [k for k in parsed.query if is_password_key(k)]
    secrets = [parsed.password or ""]
    host = parsed.host
    if host and "@" in host:  # an unencoded '@' in the password: SQLAlchemy ends the password at the first '@'
        tail, host = host.rsplit("@", 1)
        secrets += [f"{parsed.password or ''}@{tail}", tail]
    for key in keys:
        value = parsed.query[key]
        secrets += [value] if isinstance(value, str) else list(value)
    kept = sqlalchemy.engine.URL.create(parsed.drivername, parsed.username, None, host, parsed.port,
                                        parsed.database, parsed.difference_update_query(keys).query)
    return kept.render_as_string(hide_password=True), [str(s) for s in secrets if s]


def spellings(secret: str) -> set[str]:
    """The forms a password can take in a URL or a message: as is, and percent-encoded (in either case)."""
    every = "".join(f"%{b:02X}" for b in secret.encode())
    return {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret, safe=""),
            urllib.parse.quote(secret), every, every.lower()}


def redact_url(url: str) -> str:
    """A storage URL without its password, in the authority or in the query, however spelt: safe to print, log or save.

    With the password gone the URL still works when libpq finds it (PGPASSWORD, ~/.pgpass).
    """
    return _redacted(url)[0]


def redact_text(text: str, url: str) -> str:
    """`text` (e.g. a driver's error message) with every spelling of the URL's passwords masked."""
    masked = {form for secret in _redacted(url)[1] for form in spellings(secret)}
    for secret in sorted(masked, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


SETUP_SINCE = "setup_since"  # the number of the first trial made with the study's present settings


def check_setup(study: optuna.Study, attr: str, values: Mapping[str, Any], where: str, what: str) -> None:
    """Refuse a study whose results were recorded under other `values` (a ConfigError naming those that
    changed); record a new study's.

    The study keeps the `effcifar.config.fingerprint` of the values (`attr`) and the values (`attr:values`).
    A study none of whose trials finished (say, all failed on a batch larger than the data) has no
    results to protect: it takes the new values, so that the corrected command runs where it failed.
    """
    setup = fingerprint(values)
    trials = study.get_trials(deepcopy=False)
    finished = any(t.state in FINISHED for t in trials)
    if study.user_attrs.get(attr, setup) != setup and finished:
        recorded = study.user_attrs.get(f"{attr}:values")
        changed = changed_fields(recorded, json.loads(json.dumps(values))) if isinstance(recorded, dict) else []
        detail = f" ({', '.join(changed)} changed)" if changed else ""
        raise ConfigError(f"{where}: the study was made with another {what}{detail}; resume with the same settings "
                          f"or choose another --out")
    if study.user_attrs.get(attr, setup) != setup:  # the failed trials so far tried other values: left behind
        study.set_user_attr(SETUP_SINCE, len(trials))
    study.set_user_attr(attr, setup)
    study.set_user_attr(f"{attr}:values", dict(values))


def current_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials made with its present settings (`check_setup`): the failures of settings it replaced
    count toward neither the budget nor `max_failures`, so the corrected command starts afresh."""
    since = study.user_attrs.get(SETUP_SINCE, 0)
    return [t for t in study.get_trials(deepcopy=False) if t.number >= since]


def open_storage(config: StorageConfig, run_dir: Path, read_only: bool = False) -> optuna.storages.BaseStorage:
    """The journal file in the run directory, or the shared PostgreSQL database with heartbeats and retries.

    `read_only` opens what exists and creates nothing: a run directory without a journal, or a
    database without Optuna's tables, is a ConfigError.
    """
    if config.storage is None:
        journal = run_dir / JOURNAL
        if read_only and not journal.is_file():
            raise ConfigError(f"{run_dir}: no study yet (no {JOURNAL})")
        if journal.is_file():
            check_journal(journal, repair=not read_only and holds(run_dir))
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if read_only:
                return optuna.storages.RDBStorage(config.storage, skip_table_creation=True)
            with advisory_lock(config.storage, "effcifar schema"):  # workers start together
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
                return optuna.storages.RDBStorage(
                    config.storage, heartbeat_interval=max(1, round(config.heartbeat)),
                    grace_period=max(3, round(3 * config.heartbeat)), heartbeat_stale_trial_callback=retry,
                )
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError) as e:
        raise storage_error("cannot open storage", config.storage, e) from None


def check_journal(journal: Path, repair: bool) -> None:
    """Refuse a journal with a damaged record in one line; with `repair`, first cut a damaged last record.

    A writer stopped mid-record (a full disk, a kill) leaves a last line without its newline, or
    one that does not parse; appending after it would glue the next record to it and make the
    whole study unreadable. Like a write-ahead log, the writer that opens the journal next drops
    that tail, losing only the record that was never complete. Only the holder of the run
    directory's lock repairs (no other process writes the journal then), and it also removes
    Optuna's journal lock file left by a killed writer, which would otherwise stall every write.
    """
    with open(journal, "rb") as f:
        lines = f.readlines()
    damaged = next((i for i, line in enumerate(lines) if not is_record(line)), None)
    if repair:
        (journal.parent / JOURNAL_LOCK).unlink(missing_ok=True)
        if damaged == len(lines) - 1:
            keep = sum(len(line) for line in lines[:damaged])
            os.truncate(journal, keep)
            print(f"effcifar: warning: {journal}: dropped an incomplete last record (line {damaged + 1}, "
                  f"{len(lines[damaged])} bytes) left by an interrupted write", file=sys.stderr)
            return
    if damaged is not None and (damaged < len(lines) - 1 or lines[damaged].endswith(b"\n")):
        raise ConfigError(f"{journal}: line {damaged + 1} of {len(lines)} is not a valid journal record; "
                          f"the study cannot be read")
    # a last line without its newline: Optuna's reader skips it, and the next writer drops it


def is_record(line: bytes) -> bool:
    """Whether a journal line is one whole JSON record (newline-terminated)."""
    if not line.endswith(b"\n"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return False


def storage_error(action: str, url: str, error: Exception, advice: str = "") -> ConfigError:
    """A one-line error about a database: the driver's first line, with every spelling of the password masked."""
    cause = error.__cause__ or error  # Optuna wraps the SQLAlchemy error, which wraps the driver's
    reason = (str(getattr(cause, "orig", None) or cause).strip().splitlines() or [type(cause).__name__])[0]
    return ConfigError(f"{action} {redact_url(url)}: {redact_text(reason, url)}{'; ' + advice if advice else ''}")


STORAGE_LOST = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                optuna.exceptions.StorageInternalError)  # what a database gone mid-study raises


@contextlib.contextmanager
def storage_lost_is_an_error(storage: str | None) -> Iterator[None]:
    """Turn a study's database lost while it runs (the server stopped, the network cut) into a one-line error."""
    try:
        yield
    except STORAGE_LOST as e:
        if storage is None:
            raise
        raise storage_error("lost the study's database", storage, e,
                            "once it answers again, run the same command to resume") from None


def study_name(storage: optuna.storages.BaseStorage, config: StorageConfig, run_dir: Path,
               recorded: str | None) -> str:
    """The study of a run directory: the name `recorded` in it, else the only study of its journal (directories
    from before names were recorded), else `config.study`, else the directory's name.

    A `config.study` that names another study than the recorded one is a ConfigError.
    """
    known = recorded
    if known is None and config.storage is None:
        names = optuna.study.get_all_study_names(storage)
        known = names[0] if len(names) == 1 else None
    if known is not None and config.study not in (None, known):
        raise ConfigError(f"{run_dir}: holds the study {known!r}; --study {config.study!r} names another "
                          f"(leave --study out to resume it, or choose another --out)")
    return known or config.study or run_dir.name


def recorded_study(config_file: Path, cls: type[StorageConfig]) -> str | None:
    """The study name a run directory's saved config (hpo.yaml, search.yaml) records, if it has one."""
    return build_config(cls, config_file).study if config_file.is_file() else None


def load_study(config: StorageConfig, run_dir: Path) -> optuna.Study:
    """The run directory's existing study, opened read-only (`config.study` is the name recorded in it)."""
    storage = open_storage(config, run_dir, read_only=True)
    try:
        names = optuna.study.get_all_study_names(storage)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:  # e.g. no tables there
        raise storage_error("cannot read the studies of", config.storage or "", e) from None
    name = study_name(storage, dataclasses.replace(config, study=None), run_dir, config.study)  # nothing asked
    if name not in names:
        where = JOURNAL if config.storage is None else redact_url(config.storage)
        listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(f"{run_dir}: no study {name!r} in {where} (studies there: {listed or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)


@contextlib.contextmanager
def advisory_lock(url: str, name: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock named by a string, held on its own connection."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


@contextlib.contextmanager
def budget_lock(config: StorageConfig, run_dir: Path, study_name: str) -> Iterator[None]:
    """Serialise "count the trials, then ask for one" among all workers of the study.

    A file lock in the run directory for the journal; a PostgreSQL advisory lock keyed by the
    study name when workers on several machines share a database.
    """
    if config.storage is not None:
        with advisory_lock(config.storage, f"effcifar budget {study_name}"):
            yield
        return
    with open(run_dir / ".budget.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were re-queued (by us, or by Optuna's heartbeat retry callback)."""
    numbers = set()
    for t in trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            source = t.user_attrs.get("retry_of", optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t))
        if source is not None:
            numbers.add(source)
    return numbers


def budget_used(trials: list[FrozenTrial]) -> int:
    """Trials that count toward the budget: all but those replaced by a retry."""
    retried = retried_numbers(trials)
    return sum(t.number not in retried for t in trials)


def budget_spent(trials: list[FrozenTrial], budget: int, max_failures: int | None = None) -> bool:
    """Whether a worker should stop taking trials.

    Without `max_failures` every trial counts toward `budget` (a retried one once). With it, only
    complete, pruned and running ones do, so failures do not eat the budget, and `max_failures` failed
    trials (retried ones aside) stop the study: a broken setup ends instead of failing forever.
    """
    if max_failures is None:
        return budget_used(trials) >= budget
    retried = retried_numbers(trials)
    failed = sum(t.state == TrialState.FAIL and t.number not in retried for t in trials)
    return failed >= max_failures or sum(t.state in (*FINISHED, TrialState.RUNNING) for t in trials) >= budget


def trial_seed(seed: int, worker: int, trials: list[FrozenTrial]) -> int:
    """The sampler seed of the study's next trial, a function of its position in the budget.

    A sampler's generator restarts with its process, so a study resumed after a kill would
    draw its first suggestions again; seeding each trial by position makes a resumed study
    draw what an uninterrupted one would (a retried trial takes its predecessor's values).
    """
    position = budget_used(trials)
    return int.from_bytes(hashlib.sha256(f"{seed}/{worker}/{position}".encode()).digest()[:4], "big")


def fail_lost_trials(study: optuna.Study, config: StorageConfig) -> None:
    """Fail RUNNING trials whose worker process on this host is gone, and enqueue a retry of each.

    With PostgreSQL, Optuna's heartbeat does this for workers on any machine.
    """
    if config.storage is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs  # a trial just asked for may not carry its worker's host and pid yet
        if attrs.get("worker_host") != host or "worker_pid" not in attrs or pid_alive(attrs["worker_pid"]):
            continue
        # Optuna has no public call to set another process's trial attributes; tell() is public.
        study._storage.set_trial_user_attr(trial._trial_id, "worker_lost", True)
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "its worker process died")
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Beat for the trial while it runs (PostgreSQL), so that the trials of a dead worker are failed and retried.

    study.optimize beats by itself; the ask-and-tell interface has no public heartbeat
    (optuna/optuna#3293), so this is the one place that uses Optuna's internal helper. A lost
    database ends the beating quietly: the trial's own next write reports it, once, in one line.
    """
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    if not is_heartbeat_enabled(storage):
        yield
        return
    interval, stop = storage.get_heartbeat_interval(), threading.Event()

    def beat() -> None:
        with contextlib.suppress(*STORAGE_LOST):
            while True:
                storage.record_heartbeat(trial._trial_id)
                if stop.wait(interval):
                    return

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def disk_full_is_an_error(run_dir: Path) -> Iterator[None]:
    """Turn a full disk met while the study writes (its journal, a trial's files) into a one-line WriteError."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise DiskFull(f"{e.filename or run_dir}: disk full ({e.strerror}); free some space and run the same "
                         f"command again to resume") from None


def run_trials(study: optuna.Study, config: StorageConfig, run_dir: Path, budget: int,
               objective: Callable[[optuna.Trial], FrozenTrial], *, seed: int | None = None, worker: int = 0,
               sampler: Callable[[int], optuna.samplers.BaseSampler] | None = None, deadline: float | None = None,
               on_trial: OnTrial | None = None, max_failures: int | None = None) -> None:
    """The worker loop: take trials until the budget is spent (`budget_spent`) or the deadline passes.

    With a `seed`, each trial's sampler is `sampler(trial_seed(...))`, so a resumed study draws
    what an uninterrupted one would. `objective(trial)` runs one trial and tells the study; an
    interrupt fails the running trial before it propagates.
    """
    with disk_full_is_an_error(run_dir), storage_lost_is_an_error(config.storage):
        while deadline is None or time.time() < deadline:
            with budget_lock(config, run_dir, study.study_name), warnings.catch_warnings():
                # Optuna warns that heartbeats are meant for study.optimize; this loop beats itself.
                warnings.simplefilter("ignore", UserWarning)
                fail_lost_trials(study, config)
                trials = current_trials(study)
                waiting = any(t.state == TrialState.WAITING for t in trials)  # retries hold a slot already
                if not waiting and budget_spent(trials, budget, max_failures):
                    return
                if seed is not None and sampler is not None:
                    study.sampler = sampler(trial_seed(seed, worker, trials))
                trial = study.ask()
            trial.set_user_attr("worker_host", socket.gethostname())
            trial.set_user_attr("worker_pid", os.getpid())
            with heartbeat(study, trial):
                try:
                    frozen = objective(trial)
                except KeyboardInterrupt:
                    trial.set_user_attr("fail_reason", "interrupted")
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                    raise
            if on_trial is not None:
                on_trial(frozen)


def max_workers() -> int:
    """The most worker processes worth starting on this machine: 4 per CPU core (small networks share a GPU)."""
    return 4 * (os.cpu_count() or 1)


def check_workers(workers: int) -> None:
    """A ConfigError (with `field`) for a number of worker processes below 1 or beyond `max_workers()`."""
    if not 1 <= workers <= max_workers():
        raise field_error("workers", f"1 to {max_workers()} processes on this machine", workers)


def pin_worker_gpu(index: int) -> None:
    """Show worker `index` one GPU (round robin over CUDA_VISIBLE_DEVICES, else over all); call before CUDA starts."""
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    if not gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]  # counted without starting CUDA
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """End this process when `parent` ends, so that no worker writes a study whose command (and lock) is gone.

    Linux sends the parent-death signal at once; elsewhere, and if the parent died before it was set,
    a thread that watches the parent's id ends the process within a second.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _worker_main(target: Callable[..., None], args: tuple[Any, ...], index: int, parent: int) -> None:
    """Entry point of a worker process: die with the parent, the CLI's malloc settings, a GPU, then
    `target(*args, worker=index)`."""
    die_with_parent(parent)
    signal.signal(signal.SIGTERM, _terminated)  # as Ctrl-C: the running trial is told failed ("interrupted")
    configure_allocator()
    pin_worker_gpu(index)
    try:
        try:
            target(*args, worker=index)
        finally:  # from here on a SIGTERM (its command stopping the workers) ends the process quietly
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except EffcifarError as e:  # one line, like the command's own errors
        print(f"effcifar: worker {index}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # stopped with its command: no traceback
        sys.exit(130)


def _terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # once is enough: a second SIGTERM ends the process at once
    raise KeyboardInterrupt("terminated")


def stop_processes(processes: Iterable[multiprocessing.process.BaseProcess], grace: float = 10.0) -> None:
    """SIGTERM the processes still running, wait up to `grace` seconds for them, then SIGKILL the rest.

    A command that stops (Ctrl-C, SIGTERM, an error) stops its workers before it lets go of its run
    directory's lock, so that no worker goes on writing a run directory another command may take.
    """
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in alive:
        if p.is_alive():
            p.kill()
            p.join()


def start_workers(study: optuna.Study, count: int, target: Callable[..., None], args: tuple[Any, ...],
                  on_trial: OnTrial | None = None, storage: str | None = None) -> None:
    """Run `target(*args, worker=i)` in `count` spawned processes; report each finished trial; wait for them.

    ConfigError if a worker exited with an error, or if the study's database (`storage`) was lost.
    """
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_main, args=(target, args, i, os.getpid())) for i in range(count)]
    for w in workers:
        w.start()
    try:
        with storage_lost_is_an_error(storage):
            poll_workers(study, workers, on_trial)
    except BaseException:  # Ctrl-C, SIGTERM or an error here: the workers end before the lock is released
        stop_processes(workers)
        raise
    for w in workers:
        w.join()
    failed = [w.exitcode for w in workers if w.exitcode]
    if failed:
        raise ConfigError(f"{len(failed)} of {len(workers)} workers exited with an error (exit codes {failed})")


def poll_workers(study: optuna.Study, workers: list[multiprocessing.process.BaseProcess],
                 on_trial: OnTrial | None) -> None:
    """Until the workers have ended, report each trial they finish (twice a second)."""
    seen: set[int] = set()
    while any(w.is_alive() for w in workers):
        time.sleep(0.5)
        if on_trial is not None:
            for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.FAIL)):
                if t.number not in seen:
                    seen.add(t.number)
                    on_trial(t)
