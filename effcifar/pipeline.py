"""The whole series in one resumable run: baseline, HPO, supernet, search, retrain, results, report.

`run_pipeline(load_pipeline_config("quick"), "runs/NAME")` runs the stages in order, each in
its own subdirectory of the run, each reading the files of the stages before it:

    baseline/  the recipe at the pipeline's budget (`train` section), test accuracy
    hpo/       an HPO study over the `hpo.space`, trials validated on held-out images; best.json
    hpo_best/  best.json retrained at the `train` budget, test accuracy
    supernet/  a SPOS supernet with the HPO best's widths and learning rate
    search/    evolutionary (or random, NSGA-II) search over it; arch/top_K.json
    retrain/   the top architectures from scratch with the HPO best's hyper-parameters
    nas_eval/  (if `nas_eval.sample` > 0) supernet vs standalone ranking of random subnets
    results.json and report/report.html: baseline vs HPO best vs NAS best

Final runs (baseline, hpo_best, retrain) train on all `subset` training images and report test
accuracy; the searches select on the `holdout` images set aside from them, never on the test set.

Each stage writes `stage.json` when it starts (what it was started with) and again, with
`finished`, when it is done. Running the same command again skips finished stages and resumes
the interrupted one from what it saved: HPO and search studies keep their finished trials
(a trial cut short is retried), the supernet continues from its last checkpoint, retraining
keeps the finished runs; a training stage cut short starts again. A stage that was started with
other settings is refused rather than mixed.

Settings come from one YAML file per preset (`effcifar/presets/quick.yaml`, `full.yaml`), a
user file over it and `SECTION.FIELD=VALUE` overrides; every section holds fields of that
stage's own config class, so each stage can also be run alone with the same values.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

from effcifar.atomic import atomic_write
from effcifar.config import (
    build_from_layers, coerce_value, execution_fields, field_types, fingerprint, read_config_file, result_values, save_config,
)
from effcifar.errors import ConfigError
from effcifar.train import EpochMetrics, TrainConfig, train

C = TypeVar("C")
PRESETS = ("quick", "full")
COMMON = ("dataset", "data_dir", "subset", "holdout", "seed", "device", "precision", "threads")
STAGES = ("baseline", "hpo", "hpo_best", "supernet", "search", "retrain", "nas_eval")
MARKER = "stage.json"
RESULTS = "results.json"
WIDTHS = ("prep", "layer1", "layer2", "layer3")


def _stage_classes() -> dict[str, type]:
    """The config class whose fields each section holds (imported late: optuna loads with hpo and search)."""
    from effcifar.hpo.study import HpoConfig
    from effcifar.nas.search import SearchConfig
    from effcifar.nas.supernet import SupernetConfig

    return {"train": TrainConfig, "hpo": HpoConfig, "supernet": SupernetConfig, "search": SearchConfig,
            "retrain": TrainConfig, "nas_eval": TrainConfig}


# Section fields the pipeline sets itself (from the top level or from earlier stages).
RESERVED = {"train": {"arch", "space"}, "hpo": {"base", "dataset"}, "supernet": {"hparams"}, "search": set(),
            "retrain": {"arch", "space"}, "nas_eval": {"arch", "space", "total_epoch"}}
# Section fields that are not fields of the section's class: name -> type.
EXTRA_FIELDS: dict[str, dict[str, Any]] = {"retrain": {"top": int}, "nas_eval": {"sample": int, "epochs": int},
                                           "hpo": {"space": dict, "trial": dict}}


@dataclass
class PipelineConfig:
    """One pipeline: the fields every stage shares, then one section of each stage's own config fields.

    `sources` says where each value came from (preset file, user file, command line), for errors.
    """

    preset: str = "quick"
    dataset: str = "cifar100"
    data_dir: str | None = None
    subset: int = 0  # training images used by every stage (0: all)
    holdout: int = 5000  # of those, held out for the searches' validation
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig: the baseline and every final run
    hpo: dict[str, Any] = field(default_factory=dict)  # HpoConfig + space (NNI) + trial (TrainConfig for trials)
    supernet: dict[str, Any] = field(default_factory=dict)  # SupernetConfig
    search: dict[str, Any] = field(default_factory=dict)  # SearchConfig
    retrain: dict[str, Any] = field(default_factory=dict)  # top + TrainConfig over the HPO best
    nas_eval: dict[str, Any] = field(default_factory=dict)  # sample, epochs + TrainConfig
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain data (what pipeline.yaml holds; loadable as a --config file)."""
        values = dataclasses.asdict(self)
        del values["sources"], values["preset"]
        return values

    # ---- the stage configs -----------------------------------------------------------------

    def _layers(self, section: str | None, keys: set[str], extra: list[tuple[str, Mapping[str, Any]]] = ()
                ) -> list[tuple[str, dict[str, Any], bool]]:
        """Layers for build_from_layers: common values, then `extra` (source, values), then the section's."""
        layers: dict[str, dict[str, Any]] = {}
        for name in COMMON:
            if name in keys:
                layers.setdefault(self.sources.get(name, "default pipeline config"), {})[name] = getattr(self, name)
        for source, values in extra:
            for name, value in values.items():
                if name in keys:
                    layers.setdefault(source, {})[name] = value
        if section is not None:
            for name, value in getattr(self, section).items():
                if name in keys and name not in EXTRA_FIELDS.get(section, {}):  # hpo.space is the mapping, not the file
                    source = self.sources.get(f"{section}.{name}", "pipeline config")
                    layers.setdefault(f"{source}, section {section}", {})[name] = value
        return [(source, values, False) for source, values in layers.items()]

    def _build(self, cls: type[C], section: str | None, extra: list[tuple[str, Mapping[str, Any]]] = (),
               last: Mapping[str, Any] | None = None) -> C:
        """A stage config: common < extra < section < `last` (values the pipeline fixes)."""
        keys = set(field_types(cls))
        layers = self._layers(section, keys, extra)
        if last:
            layers.append(("pipeline", dict(last), False))
        return build_from_layers(cls, layers)

    def baseline_config(self) -> TrainConfig:
        """The recipe at the `train` budget, on all `subset` images, validated on the test set."""
        return self._build(TrainConfig, "train", last={"holdout": 0})

    def trial_base(self) -> TrainConfig:
        """What every HPO trial starts from: the baseline with `hpo.trial` over it, validated on held-out images."""
        layers = self._layers("train", set(field_types(TrainConfig)))
        layers.append((f"{self.sources.get('hpo.trial', 'pipeline config')}, section hpo.trial", self.hpo.get("trial", {}), False))
        return build_from_layers(TrainConfig, [*layers, ("pipeline", {"holdout": self.holdout}, False)])

    def hpo_config(self, space_file: str, base_file: str, study: str | None) -> Any:
        """The HPO study's config (the space and the trials' base written as files by the stage)."""
        from effcifar.hpo.study import HpoConfig

        return self._build(HpoConfig, "hpo", extra=[("pipeline", {"study": study})],
                           last={"space": space_file, "base": base_file})

    def final_config(self, best: Mapping[str, Any], best_source: str) -> TrainConfig:
        """The HPO best at the `train` budget: the fields `hpo.trial` shortened go back to the baseline's."""
        baseline = dataclasses.asdict(self.baseline_config())
        restored = {k: baseline[k] for k in self.hpo.get("trial", {})}
        best = {k: v for k, v in best.items() if k not in COMMON}  # the current top-level values win
        return self._build(TrainConfig, None, extra=[(best_source, best), ("train (undoing hpo.trial)", restored)],
                           last={"holdout": 0})

    def supernet_config(self, best: Mapping[str, Any], best_source: str) -> Any:
        """The supernet run: the HPO best's widths, LR, weight decay and augmentation < the `supernet` section."""
        from effcifar.nas.supernet import HPARAM_FIELDS, SupernetConfig

        hparams = {k: best[k] for k in HPARAM_FIELDS if k in best and k not in COMMON}
        layers = self._layers("supernet", set(field_types(SupernetConfig)))
        return build_from_layers(SupernetConfig, [(best_source, hparams, False), *layers,
                                                  ("pipeline", {"hparams": best_source}, False)])

    def search_config(self) -> Any:
        """The architecture search's config."""
        from effcifar.nas.search import SearchConfig

        return self._build(SearchConfig, "search")

    def retrain_base(self, final: TrainConfig, supernet: Any) -> TrainConfig:
        """Retraining: the HPO best at the final budget, in the supernet's widths, with `retrain` fields over it."""
        values = dataclasses.asdict(final)
        values.update({w: getattr(supernet, w) for w in WIDTHS})
        values.update(logits_weight=supernet.logits_weight)
        return self._build(TrainConfig, "retrain", extra=[("HPO best at the final budget", values)],
                           last={"holdout": 0})

    def nas_eval_overrides(self) -> dict[str, Any]:
        """TrainConfig fields of the nas_eval section (over the HPO best)."""
        names = set(field_types(TrainConfig))
        return {k: v for k, v in self.nas_eval.items() if k in names}

    def check(self) -> None:
        """Build every stage's config once, so a bad value stops the run before anything trains."""
        self.baseline_config()
        self.trial_base()
        from effcifar.hpo.space import SearchSpace

        space = self.hpo.get("space")
        if not space:
            raise ConfigError(f"{self.sources.get('hpo', 'pipeline config')}: field 'hpo.space': expected an NNI "
                              f"search space (a mapping of TrainConfig fields to {{_type, _value}}), got {space!r}")
        SearchSpace.from_dict(space, self.sources.get("hpo.space", "hpo.space"), field_types(TrainConfig))
        self.hpo_config("search_space.json", "base.yaml", None)
        stand_in = dataclasses.asdict(self.baseline_config())  # the HPO best does not exist yet
        final = self.final_config(stand_in, "baseline")
        self.supernet_config(stand_in, "baseline")
        self.search_config()
        self.retrain_base(final, final)
        for name, minimum in (("top", 1), ("sample", 0), ("epochs", 1)):
            section = "retrain" if name == "top" else "nas_eval"
            value = getattr(self, section).get(name, minimum)
            if value < minimum:
                raise ConfigError(f"{self.sources.get(f'{section}.{name}', 'pipeline config')}: field "
                                  f"'{section}.{name}': expected an integer >= {minimum}, got {value!r}")
        if self.nas_eval.get("sample", 0) == 1:
            raise ConfigError(f"{self.sources.get('nas_eval.sample')}: field 'nas_eval.sample': expected 0 (skip) "
                              f"or at least 2 subnets to rank, got 1")


def preset_file(preset: str) -> Path:
    """The YAML file of a preset shipped with the package."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    return Path(str(resources.files("effcifar") / "presets" / f"{preset}.yaml"))


def section_fields(section: str) -> dict[str, Any]:
    """The fields a section may set, with their types."""
    cls = _stage_classes()[section]
    names = {k: v for k, v in field_types(cls).items() if k not in COMMON and k not in RESERVED[section]}
    names.update(EXTRA_FIELDS.get(section, {}))
    return names


def _coerce(annotation: Any, value: Any, from_text: bool, source: str, path: str) -> Any:
    """One checked value; errors name the source and the dotted field."""
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: field '{path}': expected a mapping, got {value!r}")
        return value
    try:
        return coerce_value(annotation, value, from_text=from_text)
    except ValueError as e:
        raise ConfigError(f"{source}: field '{path}': expected {e}, got {value!r}") from None


def merge_layer(values: dict[str, Any], sources: dict[str, str], source: str, layer: Mapping[str, Any],
                from_text: bool) -> None:
    """Put one layer (preset, file or command line) over `values`, checking every name and type."""
    common_types = field_types(PipelineConfig)
    sections = _stage_classes()
    for key, value in layer.items():
        if key in COMMON:
            values[key] = _coerce(common_types[key], value, from_text, source, key)
            sources[key] = source
            continue
        if key not in sections:
            raise ConfigError(f"{source}: unknown field '{key}' (known: {', '.join([*COMMON, *sections])})")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: field '{key}': expected a mapping of {key} fields, got {value!r}")
        allowed = section_fields(key)
        target = values.setdefault(key, {})
        for name, item in value.items():
            path = f"{key}.{name}"
            if name in COMMON:
                raise ConfigError(f"{source}: field '{path}': set '{name}' at the top level (every stage shares it)")
            if name not in allowed:
                reserved = name in RESERVED[key]
                raise ConfigError(f"{source}: field '{path}': " + (
                    "set by the pipeline itself" if reserved else f"unknown (known: {', '.join(allowed)})"))
            if path == "hpo.trial":
                item = _coerce(dict, item, from_text, source, path)
                trial_types = field_types(TrainConfig)
                merged = dict(target.get("trial", {}))
                for k, v in item.items():
                    if k not in trial_types or k in COMMON or k in RESERVED["train"]:
                        raise ConfigError(f"{source}: field '{path}.{k}': expected a TrainConfig field other than "
                                          f"{', '.join(sorted({*COMMON, *RESERVED['train']}))}")
                    merged[k] = _coerce(trial_types[k], v, from_text, source, f"{path}.{k}")
                target["trial"] = merged
            elif path == "hpo.space" and from_text:
                raise ConfigError(f"{source}: field 'hpo.space': set the search space in a --config file")
            else:
                target[name] = _coerce(allowed[name], item, from_text, source, path)
            sources[path] = source


def nest(overrides: Mapping[str, str]) -> dict[str, Any]:
    """{"search.evaluations": "50", "hpo.trial.total_epoch": "2"} as nested mappings."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node[last] = value
    return nested


def load_pipeline_config(preset: str = "quick", file: str | Path | None = None,
                         overrides: Mapping[str, str] | None = None) -> PipelineConfig:
    """The preset's YAML < a user file < `overrides` ({"SECTION.FIELD": "text"}), every stage config checked."""
    path = preset_file(preset)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    merge_layer(values, sources, f"preset {preset} ({path})", read_config_file(path), False)
    if file is not None:
        merge_layer(values, sources, str(file), read_config_file(file), False)
    if overrides:
        merge_layer(values, sources, "command line", nest(overrides), True)
    config = PipelineConfig(preset=preset, **copy.deepcopy(values), sources=sources)
    config.check()
    return config


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
    try:
        marker = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: not valid JSON (remove the stage directory to run the stage again)") from None
    if not isinstance(marker, dict) or "fingerprint" not in marker:
        raise ConfigError(f"{path}: not a pipeline stage marker")
    return marker


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


@dataclass
class Stage:
    """One stage of a run: its directory, its settings and whether it finished."""

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

    def check(self) -> None:
        """Refuse a stage that was started with other settings."""
        if self.marker is not None and self.marker["fingerprint"] != self.fingerprint:
            changed = differences(self.marker.get("settings", {}), self.settings)
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
        self.config, self.out, self.monitor = config, Path(out_dir), monitor or Monitor()
        self.data: Any = None
        self.upstream: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    # ---- helpers ---------------------------------------------------------------------------

    def dataset(self) -> Any:
        """The dataset, loaded once for the stages that take it."""
        if self.data is None:
            from effcifar.data import load_dataset

            self.data = load_dataset(self.config.dataset, self.config.data_dir)
        return self.data

    def stage(self, name: str, settings: Mapping[str, Any], after: tuple[str, ...] = ()) -> Stage:
        """The stage `name` with its settings (and the fingerprints of the stages it reads)."""
        full = {"settings": settings, "after": {a: self.upstream[a] for a in after}}
        directory = self.out / name
        stage = Stage(name, STAGES.index(name) + 1, directory, full, read_marker(directory))
        stage.check()
        self.upstream[name] = stage.fingerprint
        return stage

    def run_stage(self, stage: Stage, work: Callable[[], str], unit: str, total: int | None = None,
                  done: Callable[[], int] = lambda: 0, fresh: bool = False) -> None:
        """Run `work` (which returns a one-line summary) unless the stage finished; mark it done.

        `done()` counts the units a resumed stage finished before (asked only if the stage runs);
        `fresh`: an unfinished stage starts again from an empty directory (a training run has no
        checkpoint to resume from).
        """
        if stage.finished:
            self.monitor.stage_skipped(stage.name, stage.number, "finished")
            return
        resumed = stage.marker is not None
        if fresh and stage.directory.exists():
            shutil.rmtree(stage.directory)
            stage.marker = None
        stage.start()
        self.monitor.stage_started(stage.name, stage.number, resumed, unit, total, done())
        start = time.perf_counter()
        summary = work()
        seconds = time.perf_counter() - start
        stage.finish(seconds)
        self.seconds[stage.name] = seconds
        self.monitor.stage_finished(stage.name, seconds, summary)

    def train_callbacks(self) -> tuple[list[Callable[[EpochMetrics], None]], Callable[[int, int], None]]:
        """Epoch lines and step progress of one training run."""
        best = [0.0]

        def on_epoch(m: EpochMetrics) -> None:
            best[0] = max(best[0], m.valid_acc)
            self.monitor.line(f"epoch {m.epoch}: train acc {m.train_acc:.2%}, valid acc {m.valid_acc:.2%}, "
                              f"{m.total_time:.0f} s")

        return [on_epoch], lambda done, total: self.monitor.advance(done, total, f"valid {best[0]:.2%}")

    def run_counter(self, total: int) -> Callable[[str], None]:
        """Progress of runs made one after another: each announces itself with a line; the ones before it are done."""
        done = [0]

        def progress(text: str) -> None:
            self.monitor.line(text)
            self.monitor.advance(done[0], total)
            done[0] += 1

        return progress

    def train_run(self, config: TrainConfig, directory: Path) -> dict[str, Any]:
        """One training run into `directory`; its summary."""
        callbacks, on_step = self.train_callbacks()
        return train(config, directory, callbacks=callbacks, on_step=on_step, data=self.dataset()).summary

    # ---- the stages ------------------------------------------------------------------------

    def run(self) -> PipelineResult:
        """Every stage in order; then results.json and the report."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out}: expected a pipeline directory, got a file")
        settings = self.out / "pipeline.yaml"
        if not settings.exists():
            self.write_settings()
        baseline = self.training_stage("baseline", self.config.baseline_config())
        best_file, best = self.hpo()
        hpo_best = self.training_stage("hpo_best", self.config.final_config(best, str(best_file)), after=("hpo",))
        supernet = self.supernet(best_file, best)
        self.search()
        nas = self.retrain(best_file, best, supernet)
        self.nas_eval(best_file)
        results = [self.result_row("baseline", baseline), self.result_row("hpo", hpo_best),
                   self.result_row("nas", nas)]
        atomic_write(self.out / RESULTS, json.dumps(results, indent=2) + "\n")
        from effcifar.report import write_report  # matplotlib only here

        report = write_report(self.out)
        self.write_settings()
        return PipelineResult(self.out, results, report, self.seconds)

    def write_settings(self) -> None:
        """pipeline.yaml: every setting of the run, usable as a --config file."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "pipeline.yaml", f"# preset: {self.config.preset}\n"
                     + yaml.safe_dump(self.config.to_dict(), sort_keys=False, default_flow_style=None))

    def result_row(self, name: str, run: Path) -> dict[str, Any]:
        """A final table row from a finished training run's summary."""
        summary = json.loads((run / "summary.json").read_text())
        return {"name": name, "test_acc": summary["test_acc"], "train_time": summary["train_time"],
                "params": summary["params"], "flops": summary["flops"], "run": str(run.relative_to(self.out))}

    def training_stage(self, name: str, config: TrainConfig, after: tuple[str, ...] = ()) -> Path:
        """A stage that is one training run (it restarts if cut short: the core trainer keeps no checkpoint)."""
        stage = self.stage(name, result_values(config), after)

        def work() -> str:
            summary = self.train_run(config, stage.directory)
            return f"test acc {summary['test_acc']:.2%}, train time {summary['train_time']:.1f} s"

        self.run_stage(stage, work, "steps", fresh=True)
        return stage.directory

    def hpo(self) -> tuple[Path, dict[str, Any]]:
        """The HPO study; best.json by the tie rule."""
        from effcifar.hpo import study as hpo

        directory = self.out / "hpo"
        base = self.config.trial_base()
        config = self.config.hpo_config(str(directory / "search_space.json"), str(directory / "base.yaml"),
                                        self.study_name("hpo"))
        settings = {"hpo": {k: v for k, v in result_values(config).items() if k not in ("space", "base")},
                    "space": self.config.hpo["space"], "base": result_values(base)}
        stage = self.stage("hpo", settings)
        before = functools.cache(lambda: trials_done(directory, config))

        def work() -> str:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            atomic_write(directory / "search_space.json", json.dumps(self.config.hpo["space"], indent=2) + "\n")
            save_config(base, directory / "base.yaml")
            done, best = before(), [0.0]

            def on_trial(t: Any) -> None:
                nonlocal done
                done += 1
                accuracy = t.user_attrs.get("accuracy")
                if t.state.name == "COMPLETE" and accuracy is not None:
                    best[0] = max(best[0], accuracy)
                detail = f"valid acc {accuracy:.2%}" if accuracy is not None else t.user_attrs.get("fail_reason", "")
                self.monitor.line(f"trial {t.number}: {t.state.name.lower()} {detail}")
                self.monitor.advance(done, config.trials, f"best {best[0]:.2%}")

            hpo.run_study(config, directory, on_trial=on_trial)
            _, chosen = hpo.write_best(directory, storage=config.storage)
            return (f"best: trial {chosen.number}, valid acc {chosen.user_attrs['accuracy']:.2%}, "
                    f"train time {chosen.user_attrs['train_time']:.1f} s")

        self.run_stage(stage, work, "trials", config.trials, before)
        best_file = directory / "best.json"
        return best_file, json.loads(best_file.read_text())

    def study_name(self, stage: str) -> str | None:
        """Studies in a shared database are named after the run (a journal is the run's own)."""
        section = getattr(self.config, stage)
        if section.get("study") or not section.get("storage"):
            return section.get("study")
        return f"{self.out.name}-{stage}"

    def supernet(self, best_file: Path, best: dict[str, Any]) -> Any:
        """The SPOS supernet with the HPO best's widths and learning rate; resumes from its checkpoints."""
        from effcifar.nas import supernet as supernet_lib

        config = self.config.supernet_config(best, str(best_file))
        stage = self.stage("supernet", result_values(config), after=("hpo",))

        def work() -> str:
            resume = bool(supernet_lib.checkpoint_files(stage.directory))
            panel = [""]

            def on_step(epoch: int, step: int, steps: int) -> None:
                self.monitor.advance((epoch - 1) * steps + step, steps * config.epochs, panel[0])

            def on_epoch(row: dict[str, Any]) -> None:
                panel[0] = f"panel {row['valid_panel_mean']:.2%}" if "valid_panel_mean" in row else ""
                self.monitor.line(f"epoch {row['epoch']}: train acc {row['train_acc']:.2%}, {panel[0]}")

            result = supernet_lib.train_supernet(config, stage.directory, resume=resume, data=self.dataset(),
                                                 on_step=on_step, on_epoch=on_epoch, warn=self.monitor.line)
            final = result.summary["final_panel"]
            return "final panel: " + ", ".join(f"{k[6:]} {v:.2%}" for k, v in final.items())

        self.run_stage(stage, work, "steps")
        return config

    def search(self) -> None:
        """The architecture search over the supernet; arch/top_K.json."""
        from effcifar.nas import search as search_lib

        config = dataclasses.replace(self.config.search_config(), study=self.study_name("search"))
        stage = self.stage("search", result_values(config), after=("supernet",))
        before = functools.cache(lambda: trials_done(stage.directory, config))

        def work() -> str:
            best, done = [0.0], [before()]

            def on_trial(t: Any) -> None:
                done[0] += 1
                accuracy = t.user_attrs.get("accuracy")
                if accuracy is not None:
                    best[0] = max(best[0], accuracy)
                self.monitor.advance(done[0], config.evaluations, f"best {best[0]:.2%}")
                if done[0] % config.population == 0 or done[0] == config.evaluations:
                    self.monitor.line(f"{done[0]} of {config.evaluations} evaluations: best held-out {best[0]:.2%}")

            study = search_lib.run_search(config, self.out / "supernet", stage.directory, on_trial=on_trial)
            top = search_lib.top_records(study, 1)
            return f"best held-out accuracy {top[0]['accuracy']:.2%} ({top[0]['flops'] / 1e6:,.1f} MFLOPs)"

        self.run_stage(stage, work, "evaluations", config.evaluations, before)

    def retrain(self, best_file: Path, best: dict[str, Any], supernet: Any) -> Path:
        """The search's top architectures from scratch with the HPO best's hyper-parameters."""
        from effcifar.nas import retrain as retrain_lib

        top = self.config.retrain.get("top", 1)
        base = self.config.retrain_base(self.config.final_config(best, str(best_file)), supernet)
        stage = self.stage("retrain", {"top": top, "base": result_values(base)}, after=("search", "hpo"))

        def work() -> str:
            progress = self.run_counter(top)
            rows = retrain_lib.retrain_top(self.out / "search", top, stage.directory, base, progress=progress)
            self.monitor.advance(top, top)
            return ", ".join(f"top_{r['rank']}: test acc {r['standalone_test_acc']:.2%}" for r in rows)

        self.run_stage(stage, work, "runs", top)
        return stage.directory / "top_0"

    def nas_eval(self, best_file: Path) -> None:
        """Supernet vs standalone ranking of random subnets (skipped when nas_eval.sample is 0)."""
        from effcifar.nas import retrain as retrain_lib

        sample, epochs = self.config.nas_eval.get("sample", 0), self.config.nas_eval.get("epochs", 1)
        overrides = self.config.nas_eval_overrides()
        computed = {k: v for k, v in overrides.items() if k not in execution_fields(TrainConfig)}
        stage = self.stage("nas_eval", {"sample": sample, "epochs": epochs, "overrides": computed,
                                        "seed": self.config.seed}, after=("supernet", "hpo"))
        if sample == 0:
            self.monitor.stage_skipped("nas_eval", stage.number, "nas_eval.sample is 0")
            return

        def work() -> str:
            progress = self.run_counter(sample)
            report = retrain_lib.nas_eval(self.out / "supernet", sample, epochs, stage.directory, self.config.seed,
                                          best_file, overrides, progress=progress)
            self.monitor.advance(sample, sample)
            return f"Kendall tau {report.tau:.3f}, Spearman rho {report.rho:.3f} over {report.n} subnets"

        self.run_stage(stage, work, "subnets", sample)


def trials_done(directory: Path, config: Any) -> int:
    """Trials of a stage's study (HPO or search) already counted against its budget; 0 if unknown yet.

    Only the run's own journal is read; a study in a shared database is counted as it runs.
    """
    import optuna

    from effcifar.studies import budget_used

    journal = directory / "study.journal"
    if config.storage is not None or not journal.is_file():
        return 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    try:
        study = optuna.load_study(study_name=config.study or directory.name, storage=storage)
    except KeyError:
        return 0
    return budget_used(study.get_trials(deepcopy=False))


def run_pipeline(config: PipelineConfig, out_dir: str | Path, monitor: Monitor | None = None) -> PipelineResult:
    """Run (or resume) the pipeline in `out_dir`; return the final table, the report and the stage times."""
    return Pipeline(config, out_dir, monitor).run()
