"""The whole series in one resumable run: baseline, HPO, supernet, search, retrain, results, report.

`load_pipeline_config` resolves the preset, a user file and `--set` overrides once into a checked
`PipelineConfig` and its `Plan`; `run_pipeline(config, "runs/NAME")` runs the stages in order. Each
stage is an object (`Stage`: its settings, the units it counts, `run`) with its own subdirectory;
it takes the results of the stages before it in memory and writes the files that let it be run,
resumed or reported alone:

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
S = TypeVar("S", bound="Stage")
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


@dataclass(frozen=True)
class Plan:
    """The stage configs that wait for no earlier stage's results, resolved from presets, files and --set once."""

    baseline: TrainConfig  # also what the final runs start from
    trial_base: TrainConfig  # what every HPO trial starts from
    hpo: Any  # HpoConfig; its space and base are written into the stage's directory
    search: Any  # SearchConfig
    retrain_top: int
    nas_eval_sample: int
    nas_eval_epochs: int
    nas_eval_overrides: dict[str, Any]  # TrainConfig fields over the HPO best


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

    def retrain_base(self, final: TrainConfig, supernet: Any) -> TrainConfig:
        """Retraining: the HPO best at the final budget, in the supernet's widths, with `retrain` fields over it."""
        values = dataclasses.asdict(final)
        values.update({w: getattr(supernet, w) for w in WIDTHS})
        values.update(logits_weight=supernet.logits_weight)
        return self._build(TrainConfig, "retrain", extra=[("HPO best at the final budget", values)],
                           last={"holdout": 0})

    @functools.cached_property
    def plan(self) -> Plan:
        """Every stage config that does not wait for an earlier stage's results, built and checked once.

        The ones that do (HPO best at the final budget, supernet, retraining) are checked here with
        the baseline standing in for the HPO best, so a bad value stops the run before anything trains.
        """
        baseline = self.baseline_config()
        trial_base = self.trial_base()
        from effcifar.hpo.space import SearchSpace

        space = self.hpo.get("space")
        if not space:
            raise ConfigError(f"{self.sources.get('hpo', 'pipeline config')}: field 'hpo.space': expected an NNI "
                              f"search space (a mapping of TrainConfig fields to {{_type, _value}}), got {space!r}")
        SearchSpace.from_dict(space, self.sources.get("hpo.space", "hpo.space"), field_types(TrainConfig))
        hpo = self._build(_stage_classes()["hpo"], "hpo", last={"space": "search_space.json", "base": "base.yaml"})
        stand_in = dataclasses.asdict(baseline)  # the HPO best does not exist yet
        final = self.final_config(stand_in, "baseline")
        self.supernet_config(stand_in, "baseline")
        search = self._build(_stage_classes()["search"], "search")
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
        names = set(field_types(TrainConfig))
        return Plan(baseline, trial_base, hpo, search, self.retrain.get("top", 1), self.nas_eval.get("sample", 0),
                    self.nas_eval.get("epochs", 1), {k: v for k, v in self.nas_eval.items() if k in names})


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
    config.plan  # builds and checks every stage config
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
# The stages


class Stage:
    """One stage of the series: its settings, the units it counts and `run`; `Pipeline.execute` marks it.

    A stage takes its inputs in memory from the stages before it; `load()` rebuilds its own
    outputs from its directory when it finished in an earlier call.
    """

    name = ""
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

    def skip_reason(self) -> str | None:
        """Why the stage is switched off, if it is."""
        return None

    def run(self) -> str:
        """Do the work (resuming what is there); return a one-line summary."""
        raise NotImplementedError

    def load(self) -> None:
        """Read the outputs of a stage that finished before."""


class TrainingStage(Stage):
    """One training run (baseline, HPO best); `summary` is its summary.json."""

    unit = "steps"
    restarts = True

    def __init__(self, pipeline: Pipeline, name: str, config: TrainConfig, after: tuple[str, ...] = ()):
        self.name, self.config, self.after = name, config, after
        super().__init__(pipeline)
        self.summary: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        return result_values(self.config)

    def run(self) -> str:
        best = 0.0

        def on_epoch(m: EpochMetrics) -> None:
            nonlocal best
            best = max(best, m.valid_acc)
            self.monitor.line(f"epoch {m.epoch}: train acc {m.train_acc:.2%}, valid acc {m.valid_acc:.2%}, "
                              f"{m.total_time:.0f} s")

        def on_step(done: int, total: int) -> None:
            self.monitor.advance(done, total, f"valid {best:.2%}")

        self.summary = train(self.config, self.directory, callbacks=[on_epoch], on_step=on_step,
                             data=self.pipeline.dataset()).summary
        return f"test acc {self.summary['test_acc']:.2%}, train time {self.summary['train_time']:.1f} s"

    def load(self) -> None:
        self.summary = json.loads((self.directory / "summary.json").read_text())

    def result(self, name: str) -> dict[str, Any]:
        """Its row of the final table."""
        return result_row(name, self.summary, self.directory.relative_to(self.pipeline.out))


class HpoStage(Stage):
    """The HPO study; `best` holds the chosen trial's TrainConfig values, `best_file` their best.json."""

    name, unit = "hpo", "trials"

    def __init__(self, pipeline: Pipeline):
        super().__init__(pipeline)
        plan = pipeline.plan
        self.base, self.space = plan.trial_base, pipeline.config.hpo["space"]
        self.config = dataclasses.replace(plan.hpo, space=str(self.directory / "search_space.json"),
                                          base=str(self.directory / "base.yaml"), study=pipeline.study_name("hpo"))
        self.best_file = self.directory / "best.json"
        self.best: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        return {"hpo": {k: v for k, v in result_values(self.config).items() if k not in ("space", "base")},
                "space": self.space, "base": result_values(self.base)}

    def total(self) -> int:
        return self.config.trials

    def done(self) -> int:
        return trials_done(self.directory, self.config)

    def run(self) -> str:
        import optuna

        from effcifar.hpo import study as hpo

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        atomic_write(self.directory / "search_space.json", json.dumps(self.space, indent=2) + "\n")
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

        hpo.run_study(self.config, self.directory, on_trial=on_trial)
        _, chosen = hpo.write_best(self.directory, storage=self.config.storage)
        self.best = chosen.user_attrs["config"]
        return (f"best: trial {chosen.number}, valid acc {chosen.user_attrs['accuracy']:.2%}, "
                f"train time {chosen.user_attrs['train_time']:.1f} s")

    def load(self) -> None:
        self.best = json.loads(self.best_file.read_text())


class SupernetStage(Stage):
    """The SPOS supernet with the HPO best's widths and learning rate; resumes from its checkpoints."""

    name, unit, after = "supernet", "steps", ("hpo",)

    def __init__(self, pipeline: Pipeline, hpo: HpoStage):
        super().__init__(pipeline)
        self.config = pipeline.config.supernet_config(hpo.best, str(hpo.best_file))

    def settings(self) -> dict[str, Any]:
        return result_values(self.config)

    def run(self) -> str:
        from effcifar.nas import supernet as supernet_lib

        panel = ""

        def on_step(epoch: int, step: int, steps: int) -> None:
            self.monitor.advance((epoch - 1) * steps + step, steps * self.config.epochs, panel)

        def on_epoch(row: dict[str, Any]) -> None:
            nonlocal panel
            panel = f"panel {row['valid_panel_mean']:.2%}" if "valid_panel_mean" in row else ""
            self.monitor.line(f"epoch {row['epoch']}: train acc {row['train_acc']:.2%}, {panel}")

        resume = bool(supernet_lib.checkpoint_files(self.directory))
        result = supernet_lib.train_supernet(self.config, self.directory, resume=resume, data=self.pipeline.dataset(),
                                             on_step=on_step, on_epoch=on_epoch, warn=self.monitor.line)
        return "final panel: " + ", ".join(f"{k[6:]} {v:.2%}" for k, v in result.summary["final_panel"].items())


class SearchStage(Stage):
    """The architecture search over the supernet; arch/top_K.json."""

    name, unit, after = "search", "evaluations", ("supernet",)

    def __init__(self, pipeline: Pipeline, supernet: SupernetStage):
        super().__init__(pipeline)
        self.supernet_dir = supernet.directory
        self.config = dataclasses.replace(pipeline.plan.search, study=pipeline.study_name("search"))

    def settings(self) -> dict[str, Any]:
        return result_values(self.config)

    def total(self) -> int:
        return self.config.evaluations

    def done(self) -> int:
        return trials_done(self.directory, self.config)

    def run(self) -> str:
        from effcifar.nas import search as search_lib

        total = self.config.evaluations
        best, done = 0.0, self.done_before

        def on_trial(t: Any) -> None:
            nonlocal best, done
            done += 1
            accuracy = t.user_attrs.get("accuracy")
            if accuracy is not None:
                best = max(best, accuracy)
            self.monitor.advance(done, total, f"best {best:.2%}")
            if done % self.config.population == 0 or done == total:
                self.monitor.line(f"{done} of {total} evaluations: best held-out {best:.2%}")

        study = search_lib.run_search(self.config, self.supernet_dir, self.directory, on_trial=on_trial)
        top = search_lib.top_records(study, 1)[0]
        return f"best held-out accuracy {top['accuracy']:.2%} ({top['flops'] / 1e6:,.1f} MFLOPs)"


class RetrainStage(Stage):
    """The search's top architectures from scratch with the HPO best's hyper-parameters; `rows` per architecture."""

    name, after = "retrain", ("search", "hpo")

    def __init__(self, pipeline: Pipeline, search: SearchStage, final: TrainConfig, supernet: SupernetStage):
        super().__init__(pipeline)
        self.search_dir, self.top = search.directory, pipeline.plan.retrain_top
        self.base = pipeline.config.retrain_base(final, supernet.config)
        self.rows: list[dict[str, Any]] = []

    def settings(self) -> dict[str, Any]:
        return {"top": self.top, "base": result_values(self.base)}

    def total(self) -> int:
        return self.top

    def run(self) -> str:
        from effcifar.nas import retrain as retrain_lib

        self.rows = retrain_lib.retrain_top(self.search_dir, self.top, self.directory, self.base,
                                            progress=self.pipeline.run_counter(self.top))
        self.monitor.advance(self.top, self.top)
        return ", ".join(f"top_{r['rank']}: test acc {r['standalone_test_acc']:.2%}" for r in self.rows)

    def load(self) -> None:
        self.rows = json.loads((self.directory / "retrain.json").read_text())

    def result(self, name: str) -> dict[str, Any]:
        """The best architecture's row of the final table."""
        r = self.rows[0]
        return {"name": name, "test_acc": r["standalone_test_acc"], "train_time": r["train_time"],
                "params": r["params"], "flops": r["flops"], "run": str(Path(self.name) / "top_0")}


class NasEvalStage(Stage):
    """Supernet vs standalone ranking of random subnets (skipped when nas_eval.sample is 0)."""

    name, unit, after = "nas_eval", "subnets", ("supernet", "hpo")

    def __init__(self, pipeline: Pipeline, supernet: SupernetStage, hpo: HpoStage):
        super().__init__(pipeline)
        plan = pipeline.plan
        self.supernet_dir, self.best_file = supernet.directory, hpo.best_file
        self.sample, self.epochs, self.overrides = plan.nas_eval_sample, plan.nas_eval_epochs, plan.nas_eval_overrides

    def settings(self) -> dict[str, Any]:
        computed = {k: v for k, v in self.overrides.items() if k not in execution_fields(TrainConfig)}
        return {"sample": self.sample, "epochs": self.epochs, "overrides": computed, "seed": self.pipeline.config.seed}

    def total(self) -> int:
        return self.sample

    def skip_reason(self) -> str | None:
        return "nas_eval.sample is 0" if self.sample == 0 else None

    def run(self) -> str:
        from effcifar.nas import retrain as retrain_lib

        report = retrain_lib.nas_eval(self.supernet_dir, self.sample, self.epochs, self.directory,
                                      self.pipeline.config.seed, self.best_file, self.overrides,
                                      progress=self.pipeline.run_counter(self.sample))
        self.monitor.advance(self.sample, self.sample)
        return f"Kendall tau {report.tau:.3f}, Spearman rho {report.rho:.3f} over {report.n} subnets"


def result_row(name: str, summary: Mapping[str, Any], run: Path) -> dict[str, Any]:
    """A final table row from a training run's summary."""
    return {"name": name, "test_acc": summary["test_acc"], "train_time": summary["train_time"],
            "params": summary["params"], "flops": summary["flops"], "run": str(run)}


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

    def study_name(self, stage: str) -> str | None:
        """Studies in a shared database are named after the run (a journal is the run's own)."""
        section = getattr(self.config, stage)
        if section.get("study") or not section.get("storage"):
            return section.get("study")
        return f"{self.out.name}-{stage}"

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
        record.check()
        self.fingerprints[stage.name] = record.fingerprint
        if record.finished:
            self.monitor.stage_skipped(stage.name, record.number, "finished")
            stage.load()
            return stage
        if stage.skip_reason() is not None:
            self.monitor.stage_skipped(stage.name, record.number, stage.skip_reason())
            return stage
        resumed = record.marker is not None
        if stage.restarts and stage.directory.exists():
            shutil.rmtree(stage.directory)
            record.marker = None
        record.start()
        stage.done_before = stage.done()
        self.monitor.stage_started(stage.name, record.number, resumed, stage.unit, stage.total(), stage.done_before)
        start = time.perf_counter()
        summary = stage.run()
        seconds = time.perf_counter() - start
        record.finish(seconds)
        self.seconds[stage.name] = seconds
        self.monitor.stage_finished(stage.name, seconds, summary)
        return stage

    def run(self) -> PipelineResult:
        """Every stage in order; then results.json and the report."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out}: expected a pipeline directory, got a file")
        if not (self.out / "pipeline.yaml").exists():
            self.write_settings()
        baseline = self.execute(TrainingStage(self, "baseline", self.plan.baseline))
        hpo = self.execute(HpoStage(self))
        final = self.config.final_config(hpo.best, str(hpo.best_file))
        hpo_best = self.execute(TrainingStage(self, "hpo_best", final, after=("hpo",)))
        supernet = self.execute(SupernetStage(self, hpo))
        search = self.execute(SearchStage(self, supernet))
        retrain = self.execute(RetrainStage(self, search, final, supernet))
        self.execute(NasEvalStage(self, supernet, hpo))
        results = [baseline.result("baseline"), hpo_best.result("hpo"), retrain.result("nas")]
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


def run_pipeline(config: PipelineConfig, out_dir: str | Path, monitor: Monitor | None = None) -> PipelineResult:
    """Run (or resume) the pipeline in `out_dir`; return the final table, the report and the stage times."""
    return Pipeline(config, out_dir, monitor).run()
