"""Hyper-parameter studies: an Optuna study whose trials are effcifar training runs.

`run_study(HpoConfig(...), "runs/NAME")` opens (or resumes) the study in the run directory's
journal file, then runs trials until the budget is spent: each trial samples the NNI search
space over the base config, trains, reports validation accuracy per epoch to the pruner and
records accuracy, train time, parameters, FLOPs and its run directory as user attributes.
The trial budget is shared by all workers and counts across restarts; the trial of a worker
that died is failed and retried (found by its process id on this machine, or by missed
heartbeats with PostgreSQL).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from effcifar.allocator import configure_allocator
from effcifar.atomic import atomic_write
from effcifar.config import build_config, field_error, field_types, save_config
from effcifar.data import CifarData, load_dataset
from effcifar.errors import ConfigError
from effcifar.hpo.experiment import SAMPLERS
from effcifar.hpo.space import SearchSpace
from effcifar.train import EpochMetrics, TrainConfig, train

PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = ("acc", "acc,time")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_RETRY = 3  # PostgreSQL: retries of a trial whose worker went silent


@dataclass
class HpoConfig:
    """One study. Trials = base TrainConfig (file) + the search space's sampled values."""

    space: str | None = None  # NNI search space (.json/.yaml)
    base: str | None = None  # TrainConfig file the sampled values override
    dataset: str | None = None  # overrides the base config's dataset
    trials: int = 20  # budget of finished (complete, pruned or failed) trials, across restarts
    timeout: float | None = None  # seconds this invocation may start new trials for
    workers: int = 1  # trial processes on this machine
    sampler: str = "tpe"
    pruner: str = "median"
    objective: str = "acc"  # acc: maximise validation accuracy; acc,time: Pareto front with train time
    study: str | None = None  # study name (default: the run directory's name)
    storage: str | None = None  # postgresql://user@host/db shared by several machines (default: the run dir's journal)
    heartbeat: float = 10.0  # seconds (PostgreSQL): a trial silent for 3 heartbeats is failed and retried
    seed: int | None = None  # sampler seed (reproducible suggestions)
    tie: float = 0.1  # percentage points: among trials this close to the best, the shortest wins

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for the first bad value."""
        if self.space is None:
            raise field_error("space", "a search space file (--space FILE)", None)
        for name, choices in (("sampler", SAMPLERS), ("pruner", PRUNERS), ("objective", OBJECTIVES)):
            if getattr(self, name) not in choices:
                raise field_error(name, f"one of {', '.join(choices)}", getattr(self, name))
        for name in ("trials", "workers"):
            if getattr(self, name) < 1:
                raise field_error(name, "a positive integer", getattr(self, name))
        if self.timeout is not None and not self.timeout > 0:
            raise field_error("timeout", "a positive number of seconds", self.timeout)
        if self.storage is not None and not self.storage.startswith(("postgresql://", "postgresql+psycopg://")):
            raise field_error("storage", "a postgresql:// URL", redact_url(self.storage))
        if not self.heartbeat >= 1:
            raise field_error("heartbeat", "a number of seconds >= 1", self.heartbeat)
        if not self.tie >= 0:
            raise field_error("tie", "a number of percentage points >= 0", self.tie)


def load_space(config: HpoConfig) -> SearchSpace:
    """The validated search space of a study: its names are TrainConfig fields (errors name the file and key)."""
    return SearchSpace.from_file(config.space, fields=field_types(TrainConfig))


def trial_config(config: HpoConfig, values: dict[str, Any], number: int) -> TrainConfig:
    """Base config file < --dataset < sampled values, validated like any TrainConfig."""
    overrides = {"dataset": config.dataset} if config.dataset else {}
    overrides.update(values)
    return build_config(TrainConfig, config.base, overrides, override_source=f"trial {number}")


def redact_url(url: str) -> str:
    """A database URL without its password, safe to print, log or save."""
    try:
        return sqlalchemy.engine.make_url(url)._replace(password=None).render_as_string(hide_password=False)
    except sqlalchemy.exc.ArgumentError:
        return "<unparseable storage URL>"


def open_storage(config: HpoConfig, run_dir: Path) -> optuna.storages.BaseStorage:
    """The journal file in the run directory, or the shared PostgreSQL database with heartbeats and retries."""
    if config.storage is None:
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "study.journal")))
    try:
        with warnings.catch_warnings(), advisory_lock(config.storage, "effcifar schema"):  # workers start together
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                config.storage, heartbeat_interval=max(1, round(config.heartbeat)),
                grace_period=max(3, round(3 * config.heartbeat)),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        password = sqlalchemy.engine.make_url(config.storage).password
        if password:
            reason = reason.replace(str(password), "***")
        raise ConfigError(f"cannot open storage {redact_url(config.storage)}: {reason}") from None


def open_study(config: HpoConfig, run_dir: Path, worker: int = 0) -> optuna.Study:
    """Create or load the study; local worker i seeds its sampler with seed + i so workers do not repeat each other."""
    storage = open_storage(config, run_dir)
    multi = config.objective == "acc,time"
    sampler = make_sampler(config.sampler, None if config.seed is None else config.seed + worker)
    pruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
        "none": optuna.pruners.NopPruner,
    }[config.pruner]()
    return optuna.create_study(
        storage=storage, study_name=config.study or run_dir.name, sampler=sampler, pruner=pruner,
        directions=["maximize", "minimize"] if multi else ["maximize"], load_if_exists=True,
    )


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler called `name` (one of SAMPLERS)."""
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }[name]()


def trial_seed(seed: int, worker: int, trials: list[FrozenTrial]) -> int:
    """The sampler seed of the study's next trial, a function of its position in the budget.

    A sampler's generator restarts with its process, so a study resumed after a kill would
    draw its first suggestions again; seeding each trial by position makes a resumed study
    draw what an uninterrupted one would (a retried trial takes its predecessor's values).
    """
    position = budget_used(trials)
    return int.from_bytes(hashlib.sha256(f"{seed}/{worker}/{position}".encode()).digest()[:4], "big")


@contextlib.contextmanager
def budget_lock(config: HpoConfig, run_dir: Path, study_name: str) -> Iterator[None]:
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


def fail_lost_trials(study: optuna.Study, config: HpoConfig) -> None:
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
        # Optuna has no public call to fail another process's trial outside heartbeat storages.
        study._storage.set_trial_user_attr(trial._trial_id, "worker_lost", True)
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "its worker process died")
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
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


class TrialRunner:
    """The objective: one trial = one training run in runs/NAME/trials/NNNN."""

    def __init__(self, config: HpoConfig, run_dir: Path, data: CifarData | None = None):
        self.config, self.run_dir = config, run_dir
        self.space = load_space(config)
        self.data = data
        self.prune = config.pruner != "none" and config.objective == "acc"

    def dataset(self, train_config: TrainConfig) -> CifarData:
        """Load the dataset once per worker and reuse it for every trial."""
        if self.data is None or self.data.name != train_config.dataset:
            self.data = load_dataset(train_config.dataset, train_config.data_dir)
        return self.data

    def __call__(self, study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
        """Run one trial and tell the study how it ended (complete, pruned or failed with a reason)."""
        trial.set_user_attr("worker_host", socket.gethostname())
        trial.set_user_attr("worker_pid", os.getpid())
        trial_dir = self.run_dir / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(trial_dir.relative_to(self.run_dir)))
        try:
            train_config = trial_config(self.config, self.space.suggest(trial), trial.number)
            trial.set_user_attr("config", dataclasses.asdict(train_config))

            def report(m: EpochMetrics) -> None:
                trial.set_user_attr("accuracy", m.valid_acc)
                trial.set_user_attr("train_time", m.train_time)
                trial.set_user_attr("epochs", m.epoch)
                if self.prune:
                    trial.report(m.valid_acc, m.epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned after epoch {m.epoch}")

            result = train(train_config, trial_dir, callbacks=[report], data=self.dataset(train_config))
        except optuna.TrialPruned:
            return study.tell(trial, state=TrialState.PRUNED)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as e:  # a failed trial is recorded and the study goes on
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}".splitlines()[0])
            return study.tell(trial, state=TrialState.FAIL)
        s = result.summary
        for key in ("params", "flops", "test_acc"):
            trial.set_user_attr(key, s[key])
        trial.set_user_attr("accuracy", s["final_valid_acc"])
        trial.set_user_attr("train_time", s["train_time"])
        values = [s["final_valid_acc"]] + ([s["train_time"]] if self.config.objective == "acc,time" else [])
        return study.tell(trial, values)


def heartbeat(study: optuna.Study, trial: optuna.Trial) -> contextlib.AbstractContextManager:
    """Beat for the trial while it runs (PostgreSQL), so that the trials of a dead worker are failed and retried."""
    # study.optimize does this itself; with ask/tell Optuna offers only its internal helper.
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, study._storage)


def run_worker(config: HpoConfig, run_dir: Path, threads: int = 0, deadline: float | None = None,
               on_trial: Callable[[FrozenTrial], None] | None = None, worker: int = 0) -> None:
    """Take trials until the budget is spent or the deadline passes."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(config, run_dir, worker)
    runner = TrialRunner(config, run_dir)
    while deadline is None or time.time() < deadline:
        with budget_lock(config, run_dir, study.study_name), warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for study.optimize; our ask/tell loop beats itself.
            warnings.simplefilter("ignore", UserWarning)
            fail_lost_trials(study, config)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)  # retries hold a slot already
            if not waiting and budget_used(trials) >= config.trials:
                return
            if config.seed is not None:
                study.sampler = make_sampler(config.sampler, trial_seed(config.seed, worker, trials))
            trial = study.ask()
        with heartbeat(study, trial):
            frozen = runner(study, trial)
        if on_trial is not None:
            on_trial(frozen)


def _worker_main(config: HpoConfig, run_dir: Path, index: int, threads: int, deadline: float | None) -> None:
    """Entry point of a worker process: the CLI's malloc settings, a GPU if there are several, then trials."""
    configure_allocator()
    pin_worker_gpu(index)
    run_worker(config, run_dir, threads, deadline, worker=index)


def pin_worker_gpu(index: int) -> None:
    """Show worker `index` one GPU (round robin over CUDA_VISIBLE_DEVICES, else over all); call before CUDA starts."""
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    if not gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]  # counted without starting CUDA
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]


def run_study(config: HpoConfig, run_dir: str | Path, on_trial: Callable[[FrozenTrial], None] | None = None) -> optuna.Study:
    """Run (or resume) a study in `run_dir` with `config.workers` trial processes; return the study."""
    config.validate()
    load_space(config)  # validate the space (and the base config) before any trial or file
    trial_config(config, {}, 0)
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        study = open_study(config, run_dir)
    except ConfigError:  # e.g. the database is unreachable: leave nothing behind
        if created:
            shutil.rmtree(run_dir)
        raise
    saved = config if config.storage is None else dataclasses.replace(config, storage=redact_url(config.storage))
    save_config(saved, run_dir / "hpo.yaml")  # never the database password
    fail_lost_trials(study, config)
    deadline = time.time() + config.timeout if config.timeout else None
    if config.workers == 1:
        run_worker(config, run_dir, deadline=deadline, on_trial=on_trial)
        return study
    threads = max(1, (os.cpu_count() or 1) // config.workers)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_main, args=(config, run_dir, i, threads, deadline))
               for i in range(config.workers)]
    supervise_workers(study, workers, on_trial)
    return study


def supervise_workers(study: optuna.Study, workers: list[Any], on_trial: Callable[[FrozenTrial], None] | None) -> None:
    """Start the worker processes, report each trial that finishes, wait for them; ConfigError if one failed."""
    for w in workers:
        w.start()
    seen: set[int] = set()
    while any(w.is_alive() for w in workers):
        time.sleep(0.5)
        if on_trial is not None:
            for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.FAIL)):
                if t.number not in seen:
                    seen.add(t.number)
                    on_trial(t)
    for w in workers:
        w.join()
    failed = [w.exitcode for w in workers if w.exitcode]
    if failed:
        raise ConfigError(f"{len(failed)} of {len(workers)} workers exited with an error (exit codes {failed})")


def select_best(trials: list[FrozenTrial], tie: float) -> FrozenTrial:
    """The seed's rule: among complete trials within `tie` points of the best accuracy, the shortest train time."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ConfigError("no complete trial yet")
    best_acc = max(t.user_attrs["accuracy"] for t in complete)
    close = [t for t in complete if t.user_attrs["accuracy"] >= best_acc - tie / 100]
    return min(close, key=lambda t: (t.user_attrs["train_time"], -t.user_attrs["accuracy"], t.number))


def load_run(run_dir: str | Path, storage: str | None = None) -> tuple[HpoConfig, optuna.Study]:
    """The config and study of an existing HPO run directory.

    A PostgreSQL study is saved without its password: give `storage` again, or let libpq find
    the password (PGPASSWORD, ~/.pgpass).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "hpo.yaml").is_file():
        raise ConfigError(f"{run_dir}: not an HPO run directory (no hpo.yaml)")
    config = build_config(HpoConfig, run_dir / "hpo.yaml")
    if storage is not None:
        config = dataclasses.replace(config, storage=storage)
    return config, open_study(config, run_dir)


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """One trial as a flat record for tables and exports."""
    a = t.user_attrs
    return {
        "number": t.number, "state": t.state.name, "accuracy": a.get("accuracy"), "train_time": a.get("train_time"),
        "epochs": a.get("epochs"), "params": a.get("params"), "flops": a.get("flops"), "test_acc": a.get("test_acc"),
        "duration": t.duration.total_seconds() if t.duration else None, "run_dir": a.get("run_dir"),
        "fail_reason": a.get("fail_reason"), **{f"param:{k}": v for k, v in t.params.items()},
    }


def write_best(run_dir: str | Path, tie: float | None = None, storage: str | None = None) -> tuple[Path, FrozenTrial]:
    """Write best.json (the chosen trial's full TrainConfig, usable as `effcifar train --config`)."""
    config, study = load_run(run_dir, storage)
    best = select_best(study.get_trials(deepcopy=False), config.tie if tie is None else tie)
    path = Path(run_dir) / "best.json"
    atomic_write(path, json.dumps(best.user_attrs["config"], indent=2) + "\n")
    return path, best


def export_trials(run_dir: str | Path, storage: str | None = None) -> tuple[Path, Path]:
    """Write trials.csv and trials.json (every trial, any state) into the run directory."""
    _, study = load_run(run_dir, storage)
    records = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    columns = list(dict.fromkeys(k for r in records for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(records)
    csv_path, json_path = Path(run_dir) / "trials.csv", Path(run_dir) / "trials.json"
    atomic_write(csv_path, out.getvalue())
    atomic_write(json_path, json.dumps(records, indent=2) + "\n")
    return csv_path, json_path
