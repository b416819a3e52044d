"""The pipeline's stages and the runner that marks, skips and resumes them (see `effcifar.pipeline`)."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

from effcifar.atomic import atomic_write
from effcifar.config import changed_fields, execution_fields, fingerprint, read_json, result_values, save_config
from effcifar.errors import ConfigError
from effcifar.pipeline.plan import STAGES, WIDTHS, PipelineConfig
from effcifar.rundir import clear, files, locked
from effcifar.train import EpochMetrics, TrainConfig, train

S = TypeVar("S", bound="Stage")
MARKER = "stage.json"
ANSWER_IN_PIPELINE = "select/answer.json"  # what the retrain stage records of its architecture file
RESULTS = "results.json"


# ---------------------------------------------------------------------------------------------
# Progress


class Monitor:
    """What a pipeline tells its viewer; the methods do nothing here (the CLI draws them)."""

    def stage_started(self, stage: str, number: int, resumed: bool, unit: str, total: int | None, done: int) -> None:
        """A stage begins (or resumes with `done` of `total` units already finished)."""

    def stage_skipped(self, stage: str, number: int, reason: str) -> None:
        """A stage is not run: finished before, or switched off."""

    def advance(self, done: int, total: int | None, best: str = "") -> None:
        """Units of the current stage finished so far, and the best result so far."""

    def line(self, text: str) -> None:
        """A log line (an epoch, a trial)."""

    def stage_finished(self, stage: str, seconds: float, summary: str) -> None:
        """A stage is done."""


# ---------------------------------------------------------------------------------------------
# Stage bookkeeping


def now() -> str:
    """The time in ISO format, UTC."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_marker(stage_dir: Path) -> dict[str, Any] | None:
    """A stage's marker, or None if the stage never started."""
    path = stage_dir / MARKER
    if not path.is_file():
        return None
    marker = read_json(path, "stage marker (remove the stage directory to run the stage again)")
    if not isinstance(marker, dict) or "fingerprint" not in marker:
        raise ConfigError(f"{path}: not a pipeline stage marker")
    return marker


@dataclass
class StageRecord:
    """A stage's marker: its directory, its settings and whether it finished."""

    name: str
    number: int
    directory: Path
    settings: dict[str, Any]
    marker: dict[str, Any] | None

    @property
    def fingerprint(self) -> str:
        """What later stages record of this one."""
        return fingerprint(self.settings)

    @property
    def finished(self) -> bool:
        """Whether the stage completed with these settings."""
        return self.marker is not None and self.marker.get("finished") is not None

    def check(self, has_results: Callable[[], bool]) -> None:
        """Refuse a stage that was started with other settings and has results (`has_results()`) they made."""
        if self.marker is not None and self.marker["fingerprint"] != self.fingerprint:
            if not has_results():  # say, it failed on a value only the data can refuse: nothing to protect,
                self.marker = None  # so the corrected command goes on there with its settings
                return
            changed = changed_fields(self.marker.get("settings", {}), self.settings)
            raise ConfigError(f"{self.directory}: stage '{self.name}' was run with other settings "
                              f"({', '.join(changed) or 'unknown'} differ); use the same settings to resume, "
                              f"or another --out")

    def start(self) -> None:
        """Write the marker of a started stage."""
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = {"stage": self.name, "fingerprint": self.fingerprint, "settings": self.settings,
                  "started": (self.marker or {}).get("started", now()), "finished": None}
        atomic_write(self.directory / MARKER, json.dumps(marker, indent=2, default=str) + "\n")
        self.marker = marker

    def finish(self, seconds: float) -> None:
        """Write the completion marker."""
        marker = {**(self.marker or {}), "finished": now(), "seconds": round(seconds, 3)}
        atomic_write(self.directory / MARKER, json.dumps(marker, indent=2, default=str) + "\n")
        self.marker = marker


# ---------------------------------------------------------------------------------------------
# The stages


class Stage:
    """One stage of the series: its settings, the units it counts and `run`; `Pipeline.execute` marks it.

    A stage takes its inputs in memory from the stages before it; `load()` rebuilds its own
    outputs from its directory when it finished in an earlier call.
    """

    name = ""
    kind = ""  # the kind of run its directory holds (effcifar.rundir)
    unit = "runs"
    after: tuple[str, ...] = ()  # the stages whose results it uses (their fingerprints are part of its own)
    restarts = False  # cut short, it starts again from an empty directory (a training run keeps no checkpoint)

    def __init__(self, pipeline: Pipeline):
        self.pipeline, self.monitor = pipeline, pipeline.monitor
        self.directory = pipeline.out / self.name
        self.done_before = 0  # set by Pipeline.execute from done()

    def settings(self) -> dict[str, Any]:
        """What the stage's results depend on (its fingerprint); execution fields are left out."""
        raise NotImplementedError

    def total(self) -> int | None:
        """Units of the whole stage (None: counted as it runs)."""
        return None

    def done(self) -> int:
        """Units that an unfinished stage completed before (asked only when it runs)."""
        return 0

    def has_results(self) -> bool:
        """Whether the stage's directory holds results of its settings (anything beside its marker)."""
        return any(path.name != MARKER for path, *_ in files(self.directory))

    def skip_reason(self) -> str | None:
        """Why the stage is switched off, if it is."""
        return None

    def run(self) -> str:
        """Do the work (resuming what is there); return a one-line summary."""
        raise NotImplementedError

    def load(self) -> None:
        """Read the outputs of a stage that finished before."""


def seed_runs(directory: Path, config: TrainConfig, seeds: int) -> list[tuple[Path, TrainConfig]]:
    """(run directory, config) of each training seed of a final run: the directory itself for one seed, else
    DIRECTORY/seed_S for the seeds S = config.seed, config.seed + 1, ..."""
    if seeds == 1:
        return [(directory, config)]
    return [(directory / f"seed_{config.seed + i}", dataclasses.replace(config, seed=config.seed + i))
            for i in range(seeds)]


def train_seeds(stage: Stage, directory: Path, config: TrainConfig, seeds: int) -> list[dict[str, Any]]:
    """The summaries of a final run's training seeds, each trained with progress lines unless it finished before
    (with the same config: `train_once`)."""
    from effcifar.nas.retrain import train_once

    summaries = []
    for run_dir, seed_config in seed_runs(directory, config, seeds):
        if seeds > 1 and (run_dir / "summary.json").is_file():
            summaries.append(train_once(seed_config, run_dir, stage.pipeline.dataset()))
            continue
        best = 0.0
        seed_text = f"seed {seed_config.seed}, " if seeds > 1 else ""

        def on_epoch(m: EpochMetrics) -> None:
            nonlocal best
            best = max(best, m.valid_acc)
            stage.monitor.line(f"{seed_text}epoch {m.epoch}: train acc {m.train_acc:.2%}, valid acc "
                               f"{m.valid_acc:.2%}, {m.total_time:.0f} s")

        def on_step(done: int, total: int) -> None:
            stage.monitor.advance(done, total, f"valid {best:.2%}")

        summaries.append(train(seed_config, run_dir, callbacks=[on_epoch], on_step=on_step,
                               data=stage.pipeline.dataset()).summary)
    return summaries


def read_seed_summaries(directory: Path, config: TrainConfig, seeds: int) -> list[dict[str, Any]]:
    """The summaries of a finished final run's training seeds."""
    return [read_json(run_dir / "summary.json", "run summary") for run_dir, _ in seed_runs(directory, config, seeds)]


def accuracy_text(summaries: list[dict[str, Any]]) -> str:
    """Test accuracy of one seed, or the mean and standard deviation over several."""
    accs = [s["test_acc"] for s in summaries]
    if len(accs) == 1:
        return f"test acc {accs[0]:.2%}"
    return f"test acc {statistics.mean(accs):.2%} ± {statistics.stdev(accs):.2%} over {len(accs)} seeds"


class TrainingStage(Stage):
    """One final training run (baseline, HPO best), with `seeds` training seeds; `summary` is the first seed's
    summary.json, `summaries` all of them."""

    kind, unit = "train", "steps"

    def __init__(self, pipeline: Pipeline, name: str, config: TrainConfig, after: tuple[str, ...] = ()):
        self.name, self.config, self.after = name, config, after
        super().__init__(pipeline)
        self.seeds = pipeline.config.seeds
        self.restarts = self.seeds == 1  # with several seeds, the seeds that finished are kept
        self.summaries: list[dict[str, Any]] = []

    @property
    def summary(self) -> dict[str, Any]:
        return self.summaries[0]

    def settings(self) -> dict[str, Any]:
        values = result_values(self.config)
        return values if self.seeds == 1 else {**values, "seeds": self.seeds}

    def run(self) -> str:
        self.summaries = train_seeds(self, self.directory, self.config, self.seeds)
        return f"{accuracy_text(self.summaries)}, train time {self.summary['train_time']:.1f} s"

    def load(self) -> None:
        self.summaries = read_seed_summaries(self.directory, self.config, self.seeds)

    def result(self, name: str) -> dict[str, Any]:
        """Its row of the final table."""
        return result_row(name, self.summaries, self.directory.relative_to(self.pipeline.out))


class HpoStage(Stage):
    """The HPO study; `best` holds the chosen trial's TrainConfig values, `best_file` their best.json."""

    name, kind, unit = "hpo", "hpo", "trials"

    def __init__(self, pipeline: Pipeline):
        super().__init__(pipeline)
        plan = pipeline.plan
        self.base, self.space = plan.trial_base, pipeline.config.hpo["space"]
        self.config = dataclasses.replace(plan.hpo, space=str(self.directory / "search_space.json"),
                                          base=str(self.directory / "base.yaml"),
                                          study=pipeline.study_name("hpo", plan.hpo, "hpo.yaml"))
        self.best_file = self.directory / "best.json"
        self.best: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        return {"hpo": {k: v for k, v in result_values(self.config).items() if k not in ("space", "base")},
                "space": self.space, "base": result_values(self.base)}

    def total(self) -> int:
        return self.config.trials

    def done(self) -> int:
        return trials_done(self.directory, self.config)

    def has_results(self) -> bool:
        return study_has_results(self)

    def run(self) -> str:
        import optuna

        from effcifar.hpo import study as hpo

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        save_config(self.base, self.directory / "base.yaml")
        done, best = self.done_before, 0.0

        def on_trial(t: Any) -> None:
            nonlocal done, best
            done += 1
            accuracy = t.user_attrs.get("accuracy")
            if t.state.name == "COMPLETE" and accuracy is not None:
                best = max(best, accuracy)
            detail = f"valid acc {accuracy:.2%}" if accuracy is not None else t.user_attrs.get("fail_reason", "")
            self.monitor.line(f"trial {t.number}: {t.state.name.lower()} {detail}")
            self.monitor.advance(done, self.config.trials, f"best {best:.2%}")

        study = hpo.run_study(self.config, self.directory, on_trial=on_trial, inline_space=self.space)
        _, chosen = hpo.write_best(self.directory, storage=self.config.storage)
        self.best = chosen.user_attrs["config"]
        return (f"{trial_counts(study.get_trials(deepcopy=False))}; best: trial {chosen.number}, valid acc "
                f"{chosen.user_attrs['accuracy']:.2%}, train time {chosen.user_attrs['train_time']:.1f} s")

    def load(self) -> None:
        self.best = read_json(self.best_file, "HPO best")


class SupernetStage(Stage):
    """The SPOS supernet with the HPO best's widths and learning rate; resumes from its checkpoints."""

    name, kind, unit, after = "supernet", "supernet", "steps", ("hpo",)

    def __init__(self, pipeline: Pipeline, hpo: HpoStage):
        super().__init__(pipeline)
        self.config = pipeline.config.supernet_config(hpo.best, str(hpo.best_file))

    def settings(self) -> dict[str, Any]:
        return result_values(self.config, flat=True)  # flat: as pipelines recorded them before the groups

    def run(self) -> str:
        from effcifar.nas.checkpoint import checkpoint_files
        from effcifar.nas.trainer import TrainingInterrupted, train_supernet

        panel = ""

        def on_step(epoch: int, step: int, steps: int) -> None:
            self.monitor.advance((epoch - 1) * steps + step, steps * self.config.epochs, panel)

        def on_epoch(row: dict[str, Any]) -> None:
            nonlocal panel
            panel = f"panel {row['valid_panel_mean']:.2%}" if "valid_panel_mean" in row else ""
            self.monitor.line(f"epoch {row['epoch']}: train acc {row['train_acc']:.2%}, {panel}")

        resume = bool(checkpoint_files(self.directory))
        try:
            result = train_supernet(self.config, self.directory, resume=resume, data=self.pipeline.dataset(),
                                    on_step=on_step, on_epoch=on_epoch, warn=self.monitor.line)
        except TrainingInterrupted as e:  # the pipeline resumes it, not `supernet train --resume`
            raise TrainingInterrupted(e.stopped, "run the same pipeline command to resume") from None
        return "final panel: " + ", ".join(f"{k[6:]} {v:.2%}" for k, v in result.summary["final_panel"].items())


class SearchStage(Stage):
    """The architecture search over the supernet, under the largest of the selection's FLOPs limits; arch/top_K.json.

    `limits` are the selection's FLOPs limits, smallest first; `default_limit` the final table's among them.
    """

    name, kind, unit, after = "search", "search", "trials", ("supernet", "hpo_best")

    def __init__(self, pipeline: Pipeline, supernet: SupernetStage, hpo_best: TrainingStage):
        super().__init__(pipeline)
        self.supernet_dir = supernet.directory
        flops = hpo_best.summary["flops"]
        self.limits, self.default_limit = pipeline.config.select_limits(flops), pipeline.config.default_limit(flops)
        self.config = dataclasses.replace(pipeline.plan.search, **pipeline.config.search_limits(flops),
                                          study=pipeline.study_name("search", pipeline.plan.search, "search.yaml"))

    def settings(self) -> dict[str, Any]:
        return result_values(self.config)

    def total(self) -> int:
        return self.config.trials

    def done(self) -> int:
        return trials_done(self.directory, self.config)

    def has_results(self) -> bool:
        return study_has_results(self)

    def run(self) -> str:
        from effcifar.nas import search as search_lib

        total, score = self.config.trials, self.config.score
        attribute = search_lib.SCORES[score]  # the trial attribute that ranks candidates
        best: float | None = None
        done = self.done_before

        def on_trial(t: Any) -> None:
            nonlocal best, done
            done += 1
            value = t.user_attrs.get(attribute)
            if value is not None:
                best = value if best is None else max(best, value)
            best_text = "" if best is None else f"best {search_lib.score_text(score, best)}"
            self.monitor.advance(done, total, best_text)
            if done % self.config.population == 0 or done == total:
                self.monitor.line(f"{done} of {total} trials: {best_text or 'none evaluated yet'}")

        study = search_lib.run_search(self.config, self.supernet_dir, self.directory, on_trial=on_trial)
        top = search_lib.top_records(study, 1)[0]
        limit = "" if self.config.max_flops is None else f", limit {self.config.max_flops / 1e6:,.1f} MFLOPs"
        return (f"{trial_counts(study.get_trials(deepcopy=False))}; best {search_lib.score_text(score, top['score'])}"
                f" (accuracy {top['accuracy']:.2%}, {top['flops'] / 1e6:,.1f} MFLOPs{limit})")


class SelectStage(Stage):
    """The search's best networks under each FLOPs limit and the incumbent ResNet-9, trained at rising fidelity on the
    held-out images (`effcifar.nas.select`): one selection in the stage's directory, or with several limits a front
    (one selection per limit in select/flops_<M>M, front.json). `result` holds the answer at the default limit,
    the final table's, whose answer.json is select/answer.json either way. When the candidates train exactly as
    the HPO best did, its run is the incumbent's: replayed, not trained again."""

    name, kind, unit, after = "select", "select", "candidates", ("search", "hpo", "hpo_best")

    def __init__(self, pipeline: Pipeline, search: SearchStage, final: TrainConfig, supernet: SupernetStage,
                 hpo_best: TrainingStage):
        super().__init__(pipeline)
        self.search_dir, self.search_storage = search.directory, search.config.storage
        self.limits = search.limits
        plan = pipeline.plan
        self.config = dataclasses.replace(plan.select, max_flops=search.default_limit,
                                          max_params=search.config.max_params,
                                          max_latency_ms=search.config.max_latency_ms,
                                          study=pipeline.study_name("select", plan.select, "select.yaml"))
        self.base = pipeline.config.select_base(final, supernet.config)
        same = result_values(self.base) == result_values(hpo_best.config)
        self.incumbent_run = seed_runs(hpo_best.directory, hpo_best.config, hpo_best.seeds)[0][0] if same else None
        self.result: Any = None

    @property
    def front(self) -> bool:
        """Whether the stage answers under several FLOPs limits."""
        return len(self.limits) > 1

    def selections(self) -> list[tuple[Path, Any]]:
        """(directory, SelectConfig) of each limit's selection, smallest limit first."""
        from effcifar.nas.select import limit_selection

        if not self.front:
            return [(self.directory, self.config)]
        return [limit_selection(self.config, self.directory, limit) for limit in self.limits]

    def settings(self) -> dict[str, Any]:
        select = result_values(self.config)
        if not select["margin"]:  # off, as in a run made before the margin existed: its stages still resume
            del select["margin"]
        settings = {"select": select, "base": result_values(self.base)}
        return settings | ({"front": self.limits} if self.front else {})

    def total(self) -> int:
        from effcifar.data import dataset_classes
        from effcifar.nas.select import pool_size

        classes = dataset_classes(self.base.dataset)
        return sum(pool_size(config, self.base, classes) for _, config in self.selections())

    def done(self) -> int:
        return sum(trials_done(directory, config) for directory, config in self.selections())

    def run(self) -> str:
        from effcifar.nas import select

        done, total, where = self.done_before, self.total(), ""

        def on_limit(limit: float) -> None:
            nonlocal where
            where = f"under {limit / 1e6:g} MFLOPs: "
            self.monitor.line(f"selection under {limit / 1e6:g} MFLOPs ({self.limits.index(limit) + 1} of "
                              f"{len(self.limits)} limits)")

        def on_trial(t: Any) -> None:
            nonlocal done
            done += 1
            accuracies = ", ".join(f"{v:.2%}" for v in t.user_attrs.get("accuracies", []))
            detail = t.user_attrs.get("fail_reason") or f"held out by epoch: {accuracies}"
            self.monitor.line(f"{where}{t.params.get('candidate', '?')}: {t.state.name.lower()}, {detail}")
            self.monitor.advance(done, total)

        if not self.front:
            self.result = select.select_from_search(self.config, self.search_dir, self.directory, self.base,
                                                    on_trial=on_trial, search_storage=self.search_storage,
                                                    incumbent_run=self.incumbent_run)
            return self.result.sentence
        results = select.select_front(self.config, self.search_dir, self.directory, self.base, self.limits,
                                      on_trial=on_trial, search_storage=self.search_storage, on_limit=on_limit,
                                      incumbent_run=self.incumbent_run)
        self.result = results[self.limits.index(self.config.max_flops)]
        atomic_write(self.directory / select.ANSWER_FILE, (self.answer_dir() / select.ANSWER_FILE).read_text())
        answers = ", ".join(f"{r.answer} under {limit / 1e6:g} MFLOPs" for limit, r in zip(self.limits, results))
        return f"front: {answers}; at the default limit, {self.result.sentence}"

    def answer_dir(self) -> Path:
        """The directory of the selection under the default limit."""
        from effcifar.nas.select import limit_dir

        return limit_dir(self.directory, self.config.max_flops) if self.front else self.directory

    def load(self) -> None:
        from effcifar.nas import select

        self.result = select.read_selection(self.answer_dir())


class RetrainStage(Stage):
    """The selection's answer from scratch on all `subset` images at the final budget, test accuracy reported.

    When the answer is the incumbent and the supernet kept the HPO best's widths, the answer is the
    HPO best's own network with its own settings: that run is its result and nothing trains again.
    Likewise a searched answer whose run in the selection trained exactly as this stage would (one
    seed, a pipeline with a `subset`): that run is its result.
    """

    name, kind, after = "retrain", "retrain", ("select", "hpo_best")
    answer_dir = "answer"  # the answer's final run (or its seeds' runs), inside the stage's directory

    def __init__(self, pipeline: Pipeline, select: SelectStage, final: TrainConfig, supernet: SupernetStage,
                 hpo_best: TrainingStage):
        super().__init__(pipeline)
        self.select, self.hpo_best = select, hpo_best
        self.base = dataclasses.replace(pipeline.config.retrain_base(final, supernet.config),
                                        arch=str((select.directory / "answer.json").resolve()))
        self.rows: list[dict[str, Any]] = []

    def settings(self) -> dict[str, Any]:
        seeds = self.pipeline.config.seeds
        base = {**result_values(self.base), "arch": ANSWER_IN_PIPELINE}  # not its absolute path: a copy resumes
        return {"base": base} | ({"seeds": seeds} if seeds > 1 else {})

    def total(self) -> int:
        return self.pipeline.config.seeds

    def is_hpo_best(self) -> bool:
        """Whether the answer is the incumbent in the HPO best's own training config (widths, logits scale)."""
        from effcifar.nas.select import INCUMBENT

        final = self.hpo_best.config
        same = all(getattr(self.base, f) == getattr(final, f) for f in (*WIDTHS, "logits_weight"))
        return self.select.result.answer == INCUMBENT and same

    def selection_run(self) -> tuple[Path, list[dict[str, Any]]] | None:
        """(run, [summary]) of the answer's own run in the selection when it trained exactly as this stage would
        train the answer (one seed; the same images, settings and seed: a pipeline with a `subset`), else None."""
        from effcifar.nas.select import ARCHS_DIR, TRIALS_DIR
        from effcifar.train import finished_summary

        chosen, selection = self.select.result.chosen, self.select.answer_dir()
        trial_dir = selection / TRIALS_DIR / chosen["name"]
        if self.pipeline.config.seeds != 1 or chosen.get("run") or not (trial_dir / "summary.json").is_file():
            return None
        arch = None if chosen["arch"] is None else str((selection / ARCHS_DIR / f"{chosen['name']}.json").resolve())
        config = dataclasses.replace(self.base, arch=arch, **(chosen.get("widths") or {}))
        try:
            summary = finished_summary(trial_dir, config)
        except ConfigError:  # trained otherwise (a `retrain` section, no subset): it trains again
            return None
        return (trial_dir.relative_to(self.pipeline.out), [summary]) if summary is not None else None

    def run(self) -> str:
        from effcifar.nas import retrain as retrain_lib

        chosen = self.select.result.chosen
        seeds = self.pipeline.config.seeds
        if self.is_hpo_best():
            run, summaries = Path(self.hpo_best.name), self.hpo_best.summaries
            how = "the incumbent won: the HPO best's network and run"
        elif (selected := self.selection_run()) is not None:
            run, summaries = selected
            how = f"{chosen['name']}'s run in the selection (trained exactly as a retrained answer would be)"
        else:
            run = Path(self.name) / self.answer_dir
            base = self.base if chosen["arch"] is not None else dataclasses.replace(  # the base network, scaled
                self.base, arch=None, **(chosen.get("widths") or {}))
            summaries = []
            for i, (run_dir, config) in enumerate(seed_runs(self.pipeline.out / run, base, seeds)):
                self.monitor.line(f"training {chosen['name']} on all subset images (seed {config.seed})")
                summaries.append(retrain_lib.train_once(config, run_dir, self.pipeline.dataset()))
                self.monitor.advance(i + 1, seeds)
            how = f"{chosen['name']} trained from scratch"
        self.rows = [{**result_row("nas", summaries, run), "answer": chosen["name"], "source": chosen["source"],
                      "holdout_acc": chosen["holdout_acc"], "max_flops": self.select.config.max_flops, "how": how,
                      "verdict": self.select.result.sentence}]
        atomic_write(self.directory / "retrain.json", json.dumps(self.rows, indent=2) + "\n")
        self.monitor.advance(seeds, seeds)
        return f"{how}: {accuracy_text(summaries)}"

    def load(self) -> None:
        self.rows = read_json(self.directory / "retrain.json", "retraining results")

    def result(self, name: str) -> dict[str, Any]:
        """The answer's row of the final table."""
        return {**self.rows[0], "name": name}


class NasEvalStage(Stage):
    """Supernet vs standalone ranking of random subnets (skipped when nas_eval.trials is 0)."""

    name, kind, unit, after = "nas_eval", "nas-eval", "subnets", ("supernet", "hpo")

    def __init__(self, pipeline: Pipeline, supernet: SupernetStage, hpo: HpoStage):
        super().__init__(pipeline)
        plan = pipeline.plan
        self.supernet_dir, self.best_file = supernet.directory, hpo.best_file
        self.trials, self.epochs, self.overrides = plan.nas_eval_trials, plan.nas_eval_epochs, plan.nas_eval_overrides

    def settings(self) -> dict[str, Any]:
        computed = {k: v for k, v in self.overrides.items() if k not in execution_fields(TrainConfig)}
        return {"trials": self.trials, "epochs": self.epochs, "overrides": computed, "seed": self.pipeline.config.seed}

    def total(self) -> int:
        return self.trials

    def skip_reason(self) -> str | None:
        return "nas_eval.trials is 0" if self.trials == 0 else None

    def run(self) -> str:
        from effcifar.nas import retrain as retrain_lib

        report = retrain_lib.nas_eval(self.supernet_dir, self.trials, self.epochs, self.directory,
                                      self.pipeline.config.seed, self.best_file, self.overrides,
                                      progress=self.pipeline.run_counter(self.trials))
        self.monitor.advance(self.trials, self.trials)
        return f"Kendall tau {report.tau:.3f}, Spearman rho {report.rho:.3f} over {report.n} subnets"


def test_images(summary: Mapping[str, Any]) -> int:
    """The number of test images behind a run's test accuracy (a summary without it validated on the test set)."""
    dataset = summary["dataset"]
    return dataset.get("test_images", dataset["valid_images"])


def result_row(name: str, summaries: list[Mapping[str, Any]], run: Path) -> dict[str, Any]:
    """A final table row from the summaries of a final run's training seeds: the mean test accuracy and train time,
    each seed's accuracy (`test_accs`, in the order of `seeds`), their standard deviation with several seeds, and
    the number of test images (for the binomial standard error of one seed)."""
    accs = [s["test_acc"] for s in summaries]
    first = summaries[0]
    row = {"name": name, "test_acc": statistics.mean(accs),
           "train_time": statistics.mean(s["train_time"] for s in summaries), "params": first["params"],
           "flops": first["flops"], "run": str(run), "seeds": [s["seed"] for s in summaries], "test_accs": accs,
           "test_images": test_images(first)}
    return row | ({"test_acc_sd": statistics.stdev(accs)} if len(accs) > 1 else {})


def trial_counts(trials: list[Any]) -> str:
    """"6 trials (1 failed, 1 pruned)": a study's trials and those that did not complete."""
    counts = collections.Counter(t.state.name for t in trials)
    others = ", ".join(f"{counts[state]} {word}" for state, word in (("FAIL", "failed"), ("PRUNED", "pruned"),
                                                                     ("RUNNING", "running")) if counts[state])
    return f"{len(trials)} trial{'' if len(trials) == 1 else 's'}" + (f" ({others})" if others else "")


def trials_done(directory: Path, config: Any) -> int:
    """Trials of a stage's study (HPO, search, selection) that completed or were pruned, as its budget counts them
    (a failed or interrupted one is tried again); 0 if unknown yet.

    Only the run's own journal is read (read-only); a study in a shared database is counted as it runs.
    """
    from effcifar.studies import JOURNAL, load_study

    if config.storage is not None or not (directory / JOURNAL).is_file():
        return 0
    try:
        study = load_study(config, directory)
    except ConfigError:  # the journal holds no study yet
        return 0
    return finished_count(study.get_trials(deepcopy=False))


def study_has_results(stage: HpoStage | SearchStage) -> bool:
    """Whether a study stage finished a trial: one whose trials all failed has nothing to protect from new settings.

    A study in a shared database is judged by the stage's files, as `Stage.has_results`.
    """
    if stage.config.storage is not None:
        return Stage.has_results(stage)
    return trials_done(stage.directory, stage.config) > 0


def finished_count(trials: list[Any]) -> int:
    """Trials that completed or were pruned: a failed or interrupted one is tried again, so it is not done."""
    from effcifar.studies import FINISHED

    return sum(t.state in FINISHED for t in trials)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class PipelineResult:
    """What a pipeline run produced."""

    out_dir: Path
    results: list[dict[str, Any]]
    report: Path
    seconds: dict[str, float]  # wall time of each stage run by this call


class Pipeline:
    """Runs the stages of one pipeline directory in order (see the module docstring)."""

    def __init__(self, config: PipelineConfig, out_dir: str | Path, monitor: Monitor | None = None):
        self.config, self.plan, self.out = config, config.plan, Path(out_dir)
        self.monitor = monitor or Monitor()
        self.data: Any = None
        self.fingerprints: dict[str, str] = {}  # of the stages so far, by name
        self.seconds: dict[str, float] = {}

    def dataset(self) -> Any:
        """The dataset, loaded once for the stages that take it."""
        if self.data is None:
            from effcifar.data import load_dataset

            self.data = load_dataset(self.config.dataset, self.config.data_dir)
        return self.data

    def study_name(self, stage: str, config: Any, config_file: str) -> str | None:
        """Studies in a shared database are named after the run when they start, then by the name their stage's
        directory records, so a renamed pipeline directory keeps them (a journal is the stage's own)."""
        from effcifar.studies import recorded_study

        section = getattr(self.config, stage)
        if section.get("study") or not section.get("storage"):
            return section.get("study")
        return recorded_study(self.out / stage / config_file, type(config)) or f"{self.out.name}-{stage}"

    def run_counter(self, total: int) -> Callable[[str], None]:
        """Progress of runs made one after another: each announces itself with a line; the ones before it are done."""
        done = 0

        def progress(text: str) -> None:
            nonlocal done
            self.monitor.line(text)
            self.monitor.advance(done, total)
            done += 1

        return progress

    def execute(self, stage: S) -> S:
        """Run `stage` unless it finished with the same settings (then load its outputs); mark it; return it.

        A stage started with other settings is refused.
        """
        settings = {"settings": stage.settings(), "after": {a: self.fingerprints[a] for a in stage.after}}
        record = StageRecord(stage.name, STAGES.index(stage.name) + 1, stage.directory, settings,
                             read_marker(stage.directory))
        record.check(stage.has_results)
        self.fingerprints[stage.name] = record.fingerprint
        if record.finished:
            self.monitor.stage_skipped(stage.name, record.number, "finished")
            stage.load()
            return stage
        if stage.skip_reason() is not None:
            self.monitor.stage_skipped(stage.name, record.number, stage.skip_reason())
            return stage
        resumed = record.marker is not None
        with locked(stage.directory, stage.kind):  # also against a lone command writing into the stage's directory
            if stage.restarts:
                clear(stage.directory)
                record.marker = None
            record.start()
            stage.done_before = stage.done()
            self.monitor.stage_started(stage.name, record.number, resumed, stage.unit, stage.total(),
                                       stage.done_before)
            start = time.perf_counter()
            summary = stage.run()
            seconds = time.perf_counter() - start
            record.finish(seconds)
        self.seconds[stage.name] = seconds
        self.monitor.stage_finished(stage.name, seconds, summary)
        return stage

    def run(self) -> PipelineResult:
        """Every stage in order, with the pipeline directory locked; then results.json and the report."""
        with locked(self.out, "pipeline"):
            if not (self.out / "pipeline.yaml").exists():
                self.write_settings()
            baseline = self.execute(TrainingStage(self, "baseline", self.plan.baseline))
            hpo = self.execute(HpoStage(self))
            final = self.config.final_config(hpo.best, str(hpo.best_file))
            hpo_best = self.execute(TrainingStage(self, "hpo_best", final, after=("hpo",)))
            supernet = self.execute(SupernetStage(self, hpo))
            search = self.execute(SearchStage(self, supernet, hpo_best))
            select = self.execute(SelectStage(self, search, final, supernet, hpo_best))
            retrain = self.execute(RetrainStage(self, select, final, supernet, hpo_best))
            self.execute(NasEvalStage(self, supernet, hpo))
            results = [baseline.result("baseline"), hpo_best.result("hpo"), retrain.result("nas")]
            atomic_write(self.out / RESULTS, json.dumps(results, indent=2) + "\n")
            from effcifar.report import write_report  # matplotlib only here

            report = write_report(self.out)
            self.write_settings()
        return PipelineResult(self.out, results, report, self.seconds)

    def write_settings(self) -> None:
        """pipeline.yaml: every setting of the run (storage URLs without their passwords), usable as a --config file."""
        atomic_write(self.out / "pipeline.yaml", f"# preset: {self.config.preset}\n"
                     + yaml.safe_dump(self.config.to_dict(), sort_keys=False, default_flow_style=None))


def run_pipeline(config: PipelineConfig, out_dir: str | Path, monitor: Monitor | None = None) -> PipelineResult:
    """Run (or resume) the pipeline in `out_dir`; return the final table, the report and the stage times."""
    return Pipeline(config, out_dir, monitor).run()
