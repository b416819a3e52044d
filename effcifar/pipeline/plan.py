"""The pipeline's settings: a preset, a user file and `SECTION.FIELD=VALUE` overrides, resolved once.

`load_pipeline_config` merges the layers, checking every name and type (errors name the source
and the dotted field), and builds every stage's config once into a `Plan`; the configs that wait
for the HPO best are built by `PipelineConfig.final_config`, `supernet_config` and `retrain_base`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, TypeVar

from effcifar.config import (
    build_from_layers, check_seed, coerce_value, field_types, flat_values, nested_keys, read_config_file,
    renamed_fields, renamed_key, shown, warn_deprecated,
)
from effcifar.errors import ConfigError
from effcifar.train import TrainConfig

C = TypeVar("C")
# A preset's name -> its files, lowest first.
PRESETS = {"quick": ("quick",), "medium": ("quick", "medium"), "gpu": ("quick", "gpu"), "full": ("full",)}
COMMON = ("dataset", "data_dir", "subset", "holdout", "seed", "seeds", "device", "precision", "threads")
STAGES = ("baseline", "hpo", "hpo_best", "supernet", "search", "select", "retrain", "nas_eval")
WIDTHS = ("prep", "layer1", "layer2", "layer3")


def _stage_classes() -> dict[str, type]:
    """The config class whose fields each section holds (imported late: optuna loads with hpo and search)."""
    from effcifar.hpo.study import HpoConfig
    from effcifar.nas.search import SearchConfig
    from effcifar.nas.select import SelectConfig
    from effcifar.nas.supernet import SupernetConfig

    return {"train": TrainConfig, "hpo": HpoConfig, "supernet": SupernetConfig, "search": SearchConfig,
            "select": SelectConfig, "retrain": TrainConfig, "nas_eval": TrainConfig}


# Section fields the pipeline sets itself (from the top level or from earlier stages).
# The selection's limits are the default limit (by default the HPO best network's own FLOPs: `default_limit`) and
# those of `select.front`; the search runs under the largest (`search_limits`).
RESERVED = {"train": {"arch", "space"}, "hpo": {"base", "dataset"}, "supernet": {"hparams"}, "search": set(),
            "select": {"max_flops", "max_params"}, "retrain": {"arch", "space"},
            "nas_eval": {"arch", "space"}}  # nas_eval's own `epochs` is each subnet's training
# Section fields that are not fields of the section's class: name -> type.
EXTRA_FIELDS: dict[str, dict[str, Any]] = {"nas_eval": {"trials": int, "epochs": int},
                                           "hpo": {"space": dict, "trial": dict},
                                           "select": {"front": list}}  # FLOPs limits, besides the default one
EXTRA_RENAMED = {"nas_eval": {"sample": "trials"}}  # old names of EXTRA_FIELDS, accepted with a warning
SAMPLER_SEEDS = ("hpo", "search")  # sections whose sampler seed is the top-level `seed` unless they set it


@dataclass(frozen=True)
class Plan:
    """The stage configs that wait for no earlier stage's results, resolved from presets, files and --set once."""

    baseline: TrainConfig  # also what the final runs start from
    trial_base: TrainConfig  # what every HPO trial starts from
    hpo: Any  # HpoConfig; its space and base are written into the stage's directory
    search: Any  # SearchConfig; its limits are set once the HPO best's network is known (`search_limits`)
    select: Any  # SelectConfig
    front: tuple[float, ...]  # `select.front`: FLOPs limits the selection also answers under, smallest first
    nas_eval_trials: int
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
    seed: int = 0  # the training seed of every run (the samplers' too, unless a section sets `sampler_seed`)
    seeds: int = 1  # training seeds of each final run (baseline, HPO best, the NAS answer): seed, seed + 1, ...
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig: the baseline and every final run
    hpo: dict[str, Any] = field(default_factory=dict)  # HpoConfig + space (NNI) + trial (TrainConfig for trials)
    supernet: dict[str, Any] = field(default_factory=dict)  # SupernetConfig
    search: dict[str, Any] = field(default_factory=dict)  # SearchConfig
    select: dict[str, Any] = field(default_factory=dict)  # SelectConfig + front (its limits: `select_limits`)
    retrain: dict[str, Any] = field(default_factory=dict)  # TrainConfig over the HPO best
    nas_eval: dict[str, Any] = field(default_factory=dict)  # trials, epochs + TrainConfig
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain data (what pipeline.yaml and --show-config hold; loadable as a --config file).

        Storage URLs are shown without their passwords; a resumed run takes the password from the
        command line again, or libpq finds it (PGPASSWORD, ~/.pgpass).
        """
        from effcifar.studies import StorageConfig, redact_url

        values = dataclasses.asdict(self)
        del values["sources"], values["preset"]
        for section, cls in _stage_classes().items():
            if issubclass(cls, StorageConfig) and values[section].get("storage"):
                values[section]["storage"] = redact_url(values[section]["storage"])
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
        if section in SAMPLER_SEEDS:  # the top-level seed seeds the section's sampler unless the section sets it
            extra = [(self.sources.get("seed", "default pipeline config"), {"sampler_seed": self.seed}), *extra]
        layers = self._layers(section, keys, extra)
        if last:
            layers.append(("pipeline", dict(last), False))
        return build_from_layers(cls, layers)

    @property
    def final_holdout(self) -> int:
        """The final runs' held-out images: `holdout` when `subset` leaves them out of training anyway (the runs then
        train on the same images as without, and are scored on them after each epoch, as every candidate is), else 0:
        with `subset` 0 the final runs train on every training image."""
        return self.holdout if self.subset else 0

    def baseline_config(self) -> TrainConfig:
        """The recipe at the `train` budget on all `subset` images, validated on `final_holdout` images, then tested."""
        return self._build(TrainConfig, "train", last={"holdout": self.final_holdout})

    def trial_base(self) -> TrainConfig:
        """What every HPO trial starts from: the baseline with `hpo.trial` over it, validated on held-out images."""
        layers = self._layers("train", set(field_types(TrainConfig)))
        layers.append((f"{self.sources.get('hpo.trial', 'pipeline config')}, section hpo.trial", self.hpo.get("trial", {}), False))
        return build_from_layers(TrainConfig, [*layers, ("pipeline", {"holdout": self.holdout}, False)])

    def final_config(self, best: Mapping[str, Any], best_source: str) -> TrainConfig:
        """The HPO best at the `train` budget: the fields `hpo.trial` shortened go back to the baseline's."""
        baseline = flat_values(self.baseline_config())
        restored = {k: baseline[k] for k in self.hpo.get("trial", {})}
        best = {k: v for k, v in best.items() if k not in COMMON}  # the current top-level values win
        return self._build(TrainConfig, None, extra=[(best_source, best), ("train (undoing hpo.trial)", restored)],
                           last={"holdout": self.final_holdout})

    def supernet_config(self, best: Mapping[str, Any], best_source: str) -> Any:
        """The supernet run: the HPO best's widths, LR, weight decay and augmentation < the `supernet` section."""
        from effcifar.nas.supernet import HPARAM_FIELDS, SupernetConfig

        hparams = {k: best[k] for k in HPARAM_FIELDS if k in best and k not in COMMON}
        layers = self._layers("supernet", set(field_types(SupernetConfig)))
        return build_from_layers(SupernetConfig, [(best_source, hparams, False), *layers,
                                                  ("pipeline", {"hparams": best_source}, False)])

    def retrain_base(self, final: TrainConfig, supernet: Any) -> TrainConfig:
        """Retraining: the HPO best at the final budget, in the supernet's widths, with `retrain` fields over it
        (`supernet`: its SupernetConfig, or a TrainConfig standing in for it)."""
        values, widths = dataclasses.asdict(final), flat_values(supernet)
        values.update({w: widths[w] for w in (*WIDTHS, "logits_weight")})
        return self._build(TrainConfig, "retrain", extra=[("HPO best at the final budget", values)],
                           last={"holdout": self.final_holdout})

    def select_base(self, final: TrainConfig, supernet: Any) -> TrainConfig:
        """The selection's candidates: trained as a retrained network is, validated on the `holdout` images."""
        return dataclasses.replace(self.retrain_base(final, supernet), holdout=self.holdout)

    def default_limit(self, network_flops: int) -> float | None:
        """The FLOPs limit of the final table's NAS answer: the `search` section's `max_flops`, else the HPO best
        network's own FLOPs, so that NAS competes at equal cost (`--set search.max_flops=none` lifts it)."""
        return self.plan.search.max_flops if "search.max_flops" in self.sources else float(network_flops)

    def select_limits(self, network_flops: int) -> list[float | None]:
        """Every FLOPs limit the selection answers under, smallest first: the default limit and `select.front`."""
        default = self.default_limit(network_flops)
        return [default] if default is None else sorted({default, *self.plan.front})

    def search_limits(self, network_flops: int) -> dict[str, Any]:
        """The search's cost limits: the largest of `select_limits`, so that its ranking covers every limit, and
        the `search` section's parameter limit."""
        return {"max_flops": self.select_limits(network_flops)[-1], "max_params": self.plan.search.max_params}

    def check_front(self, front: tuple[float, ...], search: Any, supernet: Any) -> None:
        """A one-line error before anything trains for a `select.front` nothing could meet: without a default limit
        (`search.max_flops` none), or below the smallest network of the supernet's space. The widths of that
        network are known here unless the HPO space tunes them; then the selection checks before it trains."""
        from effcifar.data import dataset_classes
        from effcifar.nas.select import smallest_flops
        from effcifar.nas.space import ArchSpace

        where = f"{self.sources.get('select.front', 'pipeline config')}: field 'select.front'"
        if front and "search.max_flops" in self.sources and search.max_flops is None:
            raise ConfigError(f"{where}: a front needs the search's FLOPs limit, and search.max_flops is none")
        tuned = {w for w in WIDTHS if w in self.hpo.get("space", {}) and w not in self.supernet}
        if not front or tuned:
            return
        channels = supernet.channels()
        smallest = smallest_flops(ArchSpace.load(supernet.space), channels, dataset_classes(self.dataset))
        if front[0] < smallest:
            raise ConfigError(f"{where}: no network of the supernet's space is within {front[0]:,.0f} FLOPs; the "
                              f"smallest has {smallest:,} (widths {'/'.join(str(channels[w]) for w in WIDTHS)})")

    @functools.cached_property
    def plan(self) -> Plan:
        """Every stage config that does not wait for an earlier stage's results, built and checked once.

        The ones that do (HPO best at the final budget, supernet, retraining) are checked here with
        the baseline standing in for the HPO best, so a bad value stops the run before anything trains.
        """
        baseline = self.baseline_config()
        trial_base = self.trial_base()
        from effcifar.hpo.space import trial_space

        space = self.hpo.get("space")
        if not space:
            raise ConfigError(f"{self.sources.get('hpo', 'pipeline config')}: field 'hpo.space': expected an NNI "
                              f"search space (a mapping of TrainConfig fields to {{_type, _value}}), got {space!r}")
        trial_space(space, self.sources.get("hpo.space", "hpo.space"))
        hpo = self._build(_stage_classes()["hpo"], "hpo", last={"space": "search_space.json", "base": "base.yaml"})
        stand_in = dataclasses.asdict(baseline)  # the HPO best does not exist yet
        final = self.final_config(stand_in, "baseline")
        supernet = self.supernet_config(stand_in, "baseline")
        search = self._build(_stage_classes()["search"], "search")
        select = self._build(_stage_classes()["select"], "select")
        front = tuple(self.select.get("front", ()))
        self.check_front(front, search, supernet)
        from effcifar.nas.select import check_inputs

        check_inputs(select, self.select_base(final, final))
        for name, minimum in (("trials", 0), ("epochs", 1)):
            section = "nas_eval"
            value = getattr(self, section).get(name, minimum)
            if value < minimum:
                raise ConfigError(f"{self.sources.get(f'{section}.{name}', 'pipeline config')}: field "
                                  f"'{section}.{name}': expected an integer >= {minimum}, got {shown(value)}")
        if self.nas_eval.get("trials", 0) == 1:
            raise ConfigError(f"{self.sources.get('nas_eval.trials')}: field 'nas_eval.trials': expected 0 (skip) "
                              f"or at least 2 subnets to rank, got 1")
        if self.seeds < 1:
            raise ConfigError(f"{self.sources.get('seeds', 'pipeline config')}: field 'seeds': expected a positive "
                              f"number of training seeds, got {self.seeds}")
        names = set(field_types(TrainConfig))
        return Plan(baseline, trial_base, hpo, search, select, front, self.nas_eval.get("trials", 0),
                    self.nas_eval.get("epochs", 1),
                    {k: v for k, v in self.nas_eval.items() if k in names and k not in EXTRA_FIELDS["nas_eval"]})


def preset_files(preset: str) -> list[Path]:
    """The YAML files of a preset shipped with the package, each over the one before (medium, gpu: over quick)."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    return [Path(str(resources.files("effcifar") / "presets" / f"{name}.yaml")) for name in PRESETS[preset]]


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
            raise ConfigError(f"{source}: field '{path}': expected a mapping, got {shown(value)}")
        return value
    try:
        return coerce_value(annotation, value, from_text=from_text)
    except ValueError as e:
        raise ConfigError(f"{source}: field '{path}': expected {e}, got {shown(value)}") from None


def group_items(keys: Mapping[str, Any], value: Any, from_text: bool, source: str, path: str) -> dict[str, Any]:
    """A section's group given under its name (`supernet: {sampler: {flops_max: 1e8}}`), checked, its keys flat."""
    items = _coerce(dict, value, from_text, source, path)
    stray = next((k for k in items if k not in keys), None)
    if stray is not None:
        raise ConfigError(f"{source}: field '{path}.{stray}': unknown (known: {', '.join(keys)})")
    return {k: _coerce(keys[k], v, from_text, source, f"{path}.{k}") for k, v in items.items()}


def merge_layer(values: dict[str, Any], sources: dict[str, str], source: str, layer: Mapping[str, Any],
                from_text: bool) -> None:
    """Put one layer (preset, file or command line) over `values`, checking every name and type."""
    common_types = field_types(PipelineConfig)
    sections = _stage_classes()
    for key, value in layer.items():
        if key in COMMON:
            values[key] = _coerce(common_types[key], value, from_text, source, key)
            if key == "seed":
                try:
                    check_seed(key, values[key])
                except ConfigError as e:
                    raise ConfigError(f"{source}: {e}") from None
            sources[key] = source
            continue
        if key not in sections:
            raise ConfigError(f"{source}: unknown field '{key}' (known: {', '.join([*COMMON, *sections])})")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: field '{key}': expected a mapping of {key} fields, got {shown(value)}")
        allowed = section_fields(key)
        renamed = {**renamed_fields(sections[key]), **EXTRA_RENAMED.get(key, {})}
        target = values.setdefault(key, {})
        for name, item in value.items():
            if name in renamed and name not in COMMON:
                warn_deprecated(f"field '{key}.{name}'", f"'{key}.{renamed[name]}'")
                name = renamed[name]
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
                    k = renamed_key(TrainConfig, k, source)
                    if k not in trial_types or k in COMMON or k in RESERVED["train"]:
                        raise ConfigError(f"{source}: field '{path}.{k}': expected a TrainConfig field other than "
                                          f"{', '.join(sorted({*COMMON, *RESERVED['train']}))}")
                    merged[k] = _coerce(trial_types[k], v, from_text, source, f"{path}.{k}")
                target["trial"] = merged
            elif path == "hpo.space" and from_text:
                raise ConfigError(f"{source}: field 'hpo.space': set the search space in a --config file")
            elif name in nested_keys(sections[key]):
                flat = group_items(nested_keys(sections[key])[name], item, from_text, source, path)
                target.update(flat)
                sources.update(dict.fromkeys((f"{key}.{k}" for k in flat), source))
            elif path == "select.front":
                target[name] = front_values(item, source)
            else:
                target[name] = _coerce(allowed[name], item, from_text, source, path)
            sources[path] = source


def front_values(value: Any, source: str) -> list[float]:
    """`select.front` as FLOPs limits, smallest first, from text ("12e6,30e6") or numbers; empty or none: none."""
    from effcifar.nas.select import front_limits

    if value is None or value == [] or isinstance(value, str) and value.strip().lower() in ("", "none"):
        return []
    try:
        return front_limits(value if isinstance(value, (str, list)) else [value])
    except ValueError as e:
        raise ConfigError(f"{source}: field 'select.front': expected {e}, got {shown(value)}") from None


def nest(overrides: Mapping[str, str]) -> dict[str, Any]:
    """{"search.trials": "50", "hpo.trial.epochs": "2"} as nested mappings."""
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
    """The preset's YAML files < a user file < `overrides` ({"SECTION.FIELD": "text"}), every stage config checked."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for path in preset_files(preset):
        merge_layer(values, sources, f"preset {preset} ({path})", read_config_file(path), False)
    if file is not None:
        merge_layer(values, sources, str(file), read_config_file(file), False)
    if overrides:
        merge_layer(values, sources, "command line", nest(overrides), True)
    config = PipelineConfig(preset=preset, **copy.deepcopy(values), sources=sources)
    config.plan  # builds and checks every stage config
    return config
