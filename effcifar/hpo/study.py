"""Hyper-parameter studies: an Optuna study whose trials are effcifar training runs.

`run_study(HpoConfig(...), "runs/NAME")` opens (or resumes) the study in the run directory's
journal file, then runs trials until the budget is spent: each trial samples the NNI search
space over the base config, trains, reports validation accuracy per epoch to the pruner and
records accuracy, train time, parameters, FLOPs and its run directory as user attributes.
The trial budget is shared by all workers and counts across restarts; the trial of a worker
that died is failed and retried (found by its process id on this machine, or by missed
heartbeats with PostgreSQL): the worker loop is `effcifar.studies`'.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from effcifar.atomic import atomic_write
from effcifar.config import (
    build_config, check_seed, check_types, execution, field_error, field_types, read_config_file, result_values, save_config,
    setting,
)
from effcifar.data import DATASET_NAMES, CifarData, load_dataset
from effcifar.errors import ConfigError, DiskFull, EffcifarError
from effcifar.hpo.experiment import SAMPLERS
from effcifar.hpo.space import SearchSpace, trial_space
from effcifar.rundir import locked
from effcifar.studies import (
    OnTrial, StorageConfig, check_setup, check_workers, current_trials, disk_full_is_an_error, fail_lost_trials,
    load_study, open_storage, recorded_study, run_trials, start_workers, study_name,
)
from effcifar.train import EpochMetrics, TrainConfig, train

PRUNERS = ("median", "hyperband", "none")
SETUP_ATTR = "hpo:setup"  # what the results mean: space, base config, objective
METHOD_ATTR = "hpo:method"  # how trials are chosen: sampler, pruner, seed
OBJECTIVES = ("acc", "acc,time")
CONFIG_FILE = "hpo.yaml"
BASE_FILE = "base.yaml"  # the trials' base config when command-line options change a file's, kept in the run directory
SPACE_FILE = "search_space.json"  # an experiment file's inline space, kept in the run directory


@dataclass
class HpoConfig(StorageConfig):
    """One study. Trials = base TrainConfig (file) + the search space's sampled values; where it lives (StorageConfig).

    The trials' training seed is the base config's `seed`; `sampler_seed` seeds what the sampler suggests.
    """

    # Old field names, accepted with a warning (`effcifar.config.read_layer`).
    RENAMED_FIELDS: ClassVar[dict[str, str]] = {"seed": "sampler_seed"}

    space: str | None = setting(None, "NNI search space over TrainConfig fields (.json or .yaml)")
    base: str | None = setting(None, "TrainConfig file the sampled values override (default: the recipe)")
    dataset: str | None = setting(None, "overrides the base config's dataset", DATASET_NAMES)
    trials: int = setting(20, "budget of complete and pruned trials, across restarts (failed ones do not count)")
    max_failures: int | None = setting(None, "stop after this many failed trials (default: trials)")
    select_on_test: bool = setting(False, "allow trials to validate, and the best to be chosen, on the test set "
                                          "(by default trials hold out training images)")
    timeout: float | None = execution(None, "seconds this invocation may start new trials for")
    workers: int = execution(1, "trial processes on this machine")
    sampler: str = setting("tpe", "Optuna sampler", SAMPLERS)
    pruner: str = setting("median", "stops poor trials early", PRUNERS)
    objective: str = setting("acc", "acc: maximise validation accuracy; acc,time: Pareto front with train time",
                             OBJECTIVES)
    sampler_seed: int | None = setting(None, "seed of the sampler (reproducible suggestions; the trials' training "
                                             "seed is the base config's seed)")
    tie: float = setting(0.1, "percentage points: among trials this close to the best, the least training work "
                              "(FLOPs x images x epochs) wins")

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for the first bad value."""
        check_types(self)
        check_seed("sampler_seed", self.sampler_seed)
        if self.space is None:
            raise field_error("space", "a search space file (--space FILE)", None)
        for name, choices in (("sampler", SAMPLERS), ("pruner", PRUNERS), ("objective", OBJECTIVES)):
            if getattr(self, name) not in choices:
                raise field_error(name, f"one of {', '.join(choices)}", getattr(self, name))
        for name in ("trials", "max_failures"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise field_error(name, "a positive integer", getattr(self, name))
        check_workers(self.workers)
        if self.timeout is not None and not self.timeout > 0:
            raise field_error("timeout", "a positive number of seconds", self.timeout)
        super().validate()
        if not self.tie >= 0:
            raise field_error("tie", "a number of percentage points >= 0", self.tie)


class TrialsFailed(EffcifarError):
    """Failed trials ended a study; the message gives the first one's reason."""


def load_space(config: HpoConfig) -> SearchSpace:
    """The validated search space of a study: its names are TrainConfig fields (errors name the file and key)."""
    return trial_space(read_config_file(config.space), str(config.space))


def default_holdout(subset: int) -> int:
    """Held-out images of trials whose base validates on the test set: a tenth of the training images
    (`subset`, or CIFAR's 50,000 when it is 0, so 5000), so that the test set never picks the best."""
    return max(1, (subset or 50_000) // 10)


def trial_config(config: HpoConfig, values: dict[str, Any], number: int,
                 base: TrainConfig | None = None) -> TrainConfig:
    """Base config (`base`, else the file config.base) < --dataset < default hold-out < sampled values, validated.

    A base with holdout 0 would validate on the test set: it gets `default_holdout` images unless
    `config.select_on_test`.
    """
    file, layer = (None, ("base config", dataclasses.asdict(base))) if base is not None else (config.base, None)
    overrides = {"dataset": config.dataset} if config.dataset else {}
    if not config.select_on_test:
        start = build_config(TrainConfig, file, overrides, base=layer)
        if start.holdout == 0:
            overrides["holdout"] = default_holdout(start.subset)
    overrides.update(values)
    return build_config(TrainConfig, file, overrides, override_source=f"trial {number}", base=layer)


def setup_values(config: HpoConfig, space: Mapping[str, Any], base: TrainConfig | None = None) -> dict[str, Any]:
    """What the recorded results mean: the search space, the trials' base config (its dataset too) and the objective."""
    return {"space": dict(space), "base": result_values(trial_config(config, {}, 0, base)),
            "objective": config.objective}


def method_values(config: HpoConfig) -> dict[str, Any]:
    """How the study chooses its trials. With the setup, a resumed study must keep it; the budget, timeout,
    workers, tie rule, heartbeat and storage credentials may change."""
    return {"sampler": config.sampler, "pruner": config.pruner, "seed": config.sampler_seed}  # key kept: old studies


def open_study(config: HpoConfig, storage: optuna.storages.BaseStorage, worker: int = 0) -> optuna.Study:
    """Create or load the study `config.study`; local worker i seeds its sampler with seed + i so workers do not
    repeat each other."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line: each trial has its own
    multi = config.objective == "acc,time"
    sampler = optuna_sampler(config.sampler, None if config.sampler_seed is None else config.sampler_seed + worker)
    pruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1),
        "none": optuna.pruners.NopPruner,
    }[config.pruner]()
    return optuna.create_study(
        storage=storage, study_name=config.study, sampler=sampler, pruner=pruner,
        directions=["maximize", "minimize"] if multi else ["maximize"], load_if_exists=True,
    )


def optuna_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler called `name` (one of SAMPLERS)."""
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }[name]()


class TrialRunner:
    """The objective: one trial = one training run in runs/NAME/trials/NNNN."""

    def __init__(self, config: HpoConfig, study: optuna.Study, run_dir: Path, data: CifarData | None = None):
        self.config, self.study, self.run_dir = config, study, run_dir
        self.space = load_space(config)
        self.data = data
        self.prune = config.pruner != "none" and config.objective == "acc"

    def dataset(self, train_config: TrainConfig) -> CifarData:
        """Load the dataset once per worker and reuse it for every trial."""
        if self.data is None or self.data.name != train_config.dataset:
            self.data = load_dataset(train_config.dataset, train_config.data_dir)
        return self.data

    def __call__(self, trial: optuna.Trial) -> FrozenTrial:
        """Run one trial and tell the study how it ended (complete, pruned or failed with a reason)."""
        trial_dir = self.run_dir / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(trial_dir.relative_to(self.run_dir)))
        try:
            values = self.space.suggest(trial)
            chosen = {name: trial.params[name] for name in self.space.choice_names() if name in trial.params}
            trial.set_user_attr("values", chosen | values)  # as trained: rounded, cast (Optuna keeps the draws)
            train_config = trial_config(self.config, values, trial.number)
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
            return self.study.tell(trial, state=TrialState.PRUNED)
        except DiskFull:  # every later trial would fail too: stop the study (the trial is failed on resume)
            raise
        except Exception as e:  # a failed trial is recorded and the study goes on
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}".splitlines()[0])
            return self.study.tell(trial, state=TrialState.FAIL)
        s = result.summary
        for key in ("params", "flops", "test_acc"):
            trial.set_user_attr(key, s[key])
        trial.set_user_attr("train_images", s["dataset"]["train_images"])
        trial.set_user_attr("work", s["flops"] * s["dataset"]["train_images"] * s["epochs_run"])
        trial.set_user_attr("accuracy", s["final_valid_acc"])
        trial.set_user_attr("train_time", s["train_time"])
        values = [s["final_valid_acc"]] + ([s["train_time"]] if self.config.objective == "acc,time" else [])
        return self.study.tell(trial, values)


def run_worker(config: HpoConfig, run_dir: Path, threads: int = 0, deadline: float | None = None,
               on_trial: OnTrial | None = None, worker: int = 0) -> None:
    """Take trials until the budget is spent or the deadline passes."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(config, open_storage(config, run_dir), worker)
    run_trials(study, config, run_dir, config.trials, TrialRunner(config, study, run_dir), seed=config.sampler_seed,
               worker=worker, sampler=lambda seed: optuna_sampler(config.sampler, seed), deadline=deadline,
               on_trial=on_trial, max_failures=config.max_failures or config.trials)


def run_study(config: HpoConfig, run_dir: str | Path, on_trial: OnTrial | None = None,
              inline_space: Mapping[str, Any] | None = None, base: TrainConfig | None = None,
              on_start: Callable[[], None] | None = None) -> optuna.Study:
    """Run (or resume) a study in `run_dir` with `config.workers` trial processes; return the study.

    `inline_space` is an experiment file's `searchSpace`: checked with everything else, then kept in
    the run directory as search_space.json (where `config.space` must point). `base` (a file's config
    with command-line options over it) replaces `config.base`, kept as base.yaml. Nothing is written
    before every check has passed; the run directory is locked while the study runs. A study that
    stops on failed trials (`max_failures`, or none complete) raises with the first failure's reason.
    `on_start()` runs once every check has passed, before the first trial.
    """
    run_dir = Path(run_dir)
    if inline_space is not None:  # kept in the run directory, never written over a file of the user's
        config = dataclasses.replace(config, space=str(run_dir / SPACE_FILE))
    config.validate()
    space = read_config_file(config.space) if inline_space is None else inline_space  # type: ignore[arg-type]
    trial_space(dict(space), config.space or SPACE_FILE)
    trial_config(config, {}, 0, base)  # the base config
    with locked(run_dir, "hpo"), disk_full_is_an_error(run_dir):
        if inline_space is not None:
            atomic_write(Path(config.space), json.dumps(inline_space, indent=2) + "\n")  # type: ignore[arg-type]
        storage = open_storage(config, run_dir)
        config = dataclasses.replace(config, study=study_name(storage, config, run_dir,
                                                              recorded_study(run_dir / CONFIG_FILE, HpoConfig)))
        study = open_study(config, storage)
        check_setup(study, SETUP_ATTR, setup_values(config, space, base), str(run_dir),
                    "search space, base config, dataset or objective")
        check_setup(study, METHOD_ATTR, method_values(config), str(run_dir), "sampler, pruner or seed")
        if base is not None:
            save_config(base, run_dir / BASE_FILE)
            config = dataclasses.replace(config, base=str(run_dir / BASE_FILE))
        save_config(config.without_password(), run_dir / CONFIG_FILE)  # never the database password
        fail_lost_trials(study, config)
        if on_start is not None:
            on_start()
        deadline = time.time() + config.timeout if config.timeout else None
        if config.workers == 1:
            run_worker(config, run_dir, deadline=deadline, on_trial=on_trial)
        else:
            threads = max(1, (os.cpu_count() or 1) // config.workers)
            start_workers(study, config.workers, run_worker, (config, run_dir, threads, deadline), on_trial,
                          config.storage)
    check_failures(current_trials(study), config.trials, config.max_failures or config.trials)
    return study


def check_failures(trials: list[FrozenTrial], budget: int, max_failures: int) -> None:
    """Raise when failed trials ended the study before its budget (or none completed): a broken setup must not
    look like success."""
    failed = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("worker_lost")]
    counted = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    if failed and (len(failed) >= max_failures and counted < budget
                   or not any(t.state == TrialState.COMPLETE for t in trials)):
        reason = failed[0].user_attrs.get("fail_reason", "no reason recorded")
        raise TrialsFailed(f"{len(failed)} failed trial(s) ended the study (max_failures {max_failures}); "
                           f"trial {failed[0].number}: {reason}")


def select_best(trials: list[FrozenTrial], tie: float) -> FrozenTrial:
    """Among complete trials within `tie` points of the best accuracy, the least training work.

    Work (FLOPs per image x training images x epochs) rather than wall time, so that the same
    trials pick the same best on any machine; trials recorded without it rank last among the close.
    """
    if not tie >= 0:
        raise ConfigError(f"tie: expected a number of percentage points >= 0, got {tie}")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ConfigError("no complete trial yet")
    best_acc = max(t.user_attrs["accuracy"] for t in complete)
    close = [t for t in complete if t.user_attrs["accuracy"] >= best_acc - tie / 100]
    return min(close, key=lambda t: (t.user_attrs.get("work", math.inf), -t.user_attrs["accuracy"], t.number))


def load_run(run_dir: str | Path, storage: str | None = None) -> tuple[HpoConfig, optuna.Study]:
    """The config and study of an existing HPO run directory, opened read-only (nothing is created).

    The study is the one named in its hpo.yaml, so a renamed or copied directory keeps it. A
    PostgreSQL study is saved without its password: give `storage` again, or let libpq find the
    password (PGPASSWORD, ~/.pgpass).
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: not an HPO run directory (no {CONFIG_FILE})")
    config = build_config(HpoConfig, run_dir / CONFIG_FILE)
    if storage is not None:
        config = dataclasses.replace(config, storage=storage)
    return config, load_study(config, run_dir)


def trial_values(t: FrozenTrial) -> dict[str, Any]:
    """The values a trial trained with: each nested choice's option, then the fields after NNI's rounding and the
    field's type (Optuna's `params` hold the raw draws, e.g. 19.7 for a quniform step of 4)."""
    values = t.user_attrs.get("values")
    return dict(t.params) if values is None else values  # a trial from before the values were recorded


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """One trial as a flat record for tables and exports."""
    a = t.user_attrs
    return {
        "number": t.number, "state": t.state.name, "accuracy": a.get("accuracy"), "work": a.get("work"),
        "train_time": a.get("train_time"),
        "epochs": a.get("epochs"), "params": a.get("params"), "flops": a.get("flops"), "test_acc": a.get("test_acc"),
        "duration": t.duration.total_seconds() if t.duration else None, "run_dir": a.get("run_dir"),
        "fail_reason": a.get("fail_reason"), **{f"param:{k}": v for k, v in trial_values(t).items()},
    }


def write_best(run_dir: str | Path, tie: float | None = None, storage: str | None = None) -> tuple[Path, FrozenTrial]:
    """Write best.json (the chosen trial's full TrainConfig, usable as `effcifar train --config`)."""
    if tie is not None and not tie >= 0:  # nan too
        raise ConfigError(f"--tie: expected a number of percentage points >= 0, got {tie}")
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
