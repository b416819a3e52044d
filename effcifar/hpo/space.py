"""NNI-format search spaces (`{"name": {"_type": ..., "_value": [...]}}`) sampled through Optuna trials.

The whole space is validated when it is loaded, so a typo fails before the first trial. Values keep
NNI's distributions: `randint [low, high]` excludes `high`; the q-types round a continuous draw to a
multiple of q (quniform/qloguniform also clip it to [low, high]); the normal family, which Optuna
lacks, maps a uniform latent draw through the normal inverse CDF (the trial records the latent).
A nested choice samples an option by its `_name` and sets the option's other keys as config fields;
its Optuna names are paths like `arch/wide/layer1`, so every name always has one distribution.
When the config's field types are known (`fields` given as a mapping of name to type), choice
options and fixed values are type-checked up front and sampled numbers are cast to the field's type;
an int field then takes choice, randint, or a q-type whose q (and quniform/qloguniform bounds) are
integers.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import optuna

from effcifar.config import base_type, coerce_value, field_types, read_config_file
from effcifar.errors import ConfigError

NNI_TYPES = ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform",
             "normal", "qnormal", "lognormal", "qlognormal")
SHAPES = {"randint": "[low, high]", "uniform": "[low, high]", "quniform": "[low, high, q]",
          "loguniform": "[low, high]", "qloguniform": "[low, high, q]", "normal": "[mu, sigma]",
          "qnormal": "[mu, sigma, q]", "lognormal": "[mu, sigma]", "qlognormal": "[mu, sigma, q]"}
LATENT = (1e-6, 1 - 1e-6)  # the normal family's uniform latent; the inverse CDF is finite inside it
SCALARS = (int, float, str, bool, type(None))
UNTYPED = object()  # a field whose type is unknown (fields given as names only)


@dataclass(frozen=True)
class Param:
    """One sampled config field; `name` is its Optuna parameter name."""

    name: str
    field: str
    type: str
    value: tuple[Any, ...]
    cast: type | None = None  # int or float: the field's type, applied to sampled numbers


@dataclass(frozen=True)
class NestedChoice:
    """A choice among named options; each option maps config fields to fixed values or parameters."""

    name: str
    options: dict[str, dict[str, Any]]


Node = Param | NestedChoice


@dataclass(frozen=True)
class Checker:
    """What validation needs to know: where the space came from and which fields (and types) exist."""

    source: str
    fields: dict[str, Any] | None  # field name -> annotation or UNTYPED; None: any name

    def error(self, path: str, message: str) -> ConfigError:
        """A one-line error naming the file and the key."""
        return ConfigError(f"{self.source}: key '{path}': {message}")

    def annotation(self, path: str, field: str) -> Any:
        """The field's type annotation (UNTYPED if unknown); an error for a name that is not a field."""
        if self.fields is None:
            return UNTYPED
        if field not in self.fields:
            close = difflib.get_close_matches(field, list(self.fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise self.error(path, f"not a TrainConfig field{hint}")
        return self.fields[field]

    def typed_value(self, path: str, annotation: Any, value: Any, what: str) -> Any:
        """A choice option or fixed value converted to the field's type (integral floats to int)."""
        if not isinstance(value, SCALARS):
            raise self.error(path, f"expected {what} that are numbers, strings, booleans or null, got {value!r}")
        if annotation is UNTYPED:
            return value
        kind, _ = base_type(annotation)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        try:
            return coerce_value(annotation, value)
        except ValueError:
            raise self.error(path, f"expected {what} of type {kind.__name__}, got {value!r}") from None


def parse_mapping(checker: Checker, spec: Any, prefix: str) -> list[Node]:
    """Validate `{name: {"_type", "_value"}}`; sibling parameters of a config (known fields) must set different
    fields."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{checker.source}: expected a mapping of parameter names to "
                          f"{{_type, _value}}, got {type(spec).__name__}")
    nodes: list[Node] = []
    owner: dict[str, str] = {}
    for key, item in spec.items():
        path = f"{prefix}{key}"
        node = parse_param(checker, str(key), path, item)
        for field in node_fields(node) if checker.fields is not None else ():  # any names: NNI's nested form
            if field in owner:
                raise checker.error(path, f"sets field '{field}', which '{prefix}{owner[field]}' also sets")
            owner[field] = str(key)
        nodes.append(node)
    return nodes


def parse_param(checker: Checker, key: str, path: str, spec: Any) -> Node:
    """Validate one `{"_type": ..., "_value": ...}` and return its node."""
    if not isinstance(spec, dict):
        raise checker.error(path, f"expected a mapping with _type and _value, got {spec!r}")
    for required in ("_type", "_value"):
        if required not in spec:
            raise checker.error(path, f"missing {required} (expected a mapping with _type and _value)")
    extra = [k for k in spec if k not in ("_type", "_value")]
    if extra:
        raise checker.error(path, f"unknown key '{extra[0]}' (a parameter has only _type and _value)")
    kind, value = spec["_type"], spec["_value"]
    if kind not in NNI_TYPES:
        raise checker.error(path, f"expected _type one of {', '.join(NNI_TYPES)}, got {kind!r}")
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise checker.error(path, f"expected _value a non-empty list of options, got {value!r}")
        if any(isinstance(option, dict) for option in value):
            return parse_nested(checker, path, value)
        annotation = checker.annotation(path, key)
        options = tuple(checker.typed_value(path, annotation, option, "choice options") for option in value)
        return Param(path, key, kind, options)
    numbers = check_numbers(checker, path, kind, value)
    return Param(path, key, kind, numbers, numeric_cast(checker, path, kind, numbers, checker.annotation(path, key)))


def check_numbers(checker: Checker, path: str, kind: str, value: Any) -> tuple[float, ...]:
    """The numeric `_value` of a non-choice type, checked against NNI's rules for that type."""
    shape = SHAPES[kind]
    size = shape.count(",") + 1
    if not isinstance(value, list) or len(value) != size:
        raise checker.error(path, f"expected _value {shape}, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        raise checker.error(path, f"expected _value {shape} of finite numbers, got {value!r}")
    if kind == "randint" and not all(isinstance(v, int) for v in value):
        raise checker.error(path, f"expected _value {shape} of integers, got {value!r}")
    if "uniform" in kind or kind == "randint":
        if not value[0] < value[1]:
            raise checker.error(path, f"expected _value {shape} with low < high, got {value!r}")
        if "loguniform" in kind and not value[0] > 0:
            raise checker.error(path, f"expected _value {shape} with 0 < low < high, got {value!r}")
    elif not value[1] > 0:
        raise checker.error(path, f"expected _value {shape} with sigma > 0, got {value!r}")
    if kind.startswith("q") and not value[2] > 0:
        raise checker.error(path, f"expected _value {shape} with q > 0, got {value!r}")
    return tuple(value)


def numeric_cast(checker: Checker, path: str, kind: str, value: tuple[float, ...], annotation: Any) -> type | None:
    """int or float for a typed numeric field; an error when the type cannot yield that field's type."""
    if annotation is UNTYPED:
        return None
    field_kind, _ = base_type(annotation)
    if field_kind is float:
        return float
    integral = {"randint": value, "quniform": value, "qloguniform": value, "qnormal": value[2:],
                "qlognormal": value[2:]}.get(kind)
    if field_kind is int and integral is not None and all(float(v).is_integer() for v in integral):
        return int
    raise checker.error(path, f"field of type {field_kind.__name__} cannot take _type {kind}; expected choice"
                        + (", randint, or a q-type with integer q (and bounds)" if field_kind is int else ""))


def parse_nested(checker: Checker, path: str, options: list[Any]) -> NestedChoice:
    """Validate a nested choice: every option a mapping with a unique string `_name`."""
    parsed: dict[str, dict[str, Any]] = {}
    for option in options:
        if not isinstance(option, dict):
            raise checker.error(path, f"expected all options to be mappings with _name (a nested choice), "
                                      f"got a mix including {option!r}")
        name = option.get("_name")
        if not isinstance(name, str):
            raise checker.error(path, f"expected every nested option to have a string _name, got {option!r}")
        if name in parsed:
            raise checker.error(path, f"duplicate _name '{name}' among the options")
        prefix = f"{path}/{name}/"
        nested = {k: v for k, v in option.items() if k != "_name" and isinstance(v, dict)}
        nodes = dict(zip(nested, parse_mapping(checker, nested, prefix)))
        sampled = {field for node in nodes.values() for field in node_fields(node)}
        body: dict[str, Any] = {}
        for field, value in option.items():
            if field in nodes:
                body[field] = nodes[field]
            elif field != "_name":
                if field in sampled:
                    raise checker.error(f"{prefix}{field}", "also set by a parameter of the same option")
                annotation = checker.annotation(f"{prefix}{field}", field)
                body[field] = checker.typed_value(f"{prefix}{field}", annotation, value, "fixed values")
        parsed[name] = body
    return NestedChoice(path, parsed)


def node_fields(node: Node) -> list[str]:
    """The config fields a node can set, in order, without repeats."""
    if isinstance(node, Param):
        return [node.field]
    fields: dict[str, None] = {}
    for body in node.options.values():
        for field, item in body.items():
            fields.update(dict.fromkeys(node_fields(item) if isinstance(item, (Param, NestedChoice)) else [field]))
    return list(fields)


def sample(trial: optuna.trial.BaseTrial, param: Param) -> Any:
    """One value from NNI's distribution for this parameter."""
    kind, value = param.type, param.value
    if kind == "choice":
        return trial.suggest_categorical(param.name, list(value))
    if kind == "randint":
        x: float = trial.suggest_int(param.name, value[0], value[1] - 1)
    elif "uniform" in kind:
        x = trial.suggest_float(param.name, value[0], value[1], log="loguniform" in kind)
    else:
        x = NormalDist(value[0], value[1]).inv_cdf(trial.suggest_float(param.name, *LATENT))
        x = math.exp(x) if "lognormal" in kind else x
    if kind.startswith("q"):
        x = round(x / value[2]) * value[2]
        x = min(max(x, value[0]), value[1]) if "uniform" in kind else x
    return param.cast(x) if param.cast else x


def collect(trial: optuna.trial.BaseTrial, node: Node, values: dict[str, Any]) -> None:
    """Sample a node into `values` (a nested choice: its chosen option's fields)."""
    if isinstance(node, Param):
        put(values, node.field, sample(trial, node), node.name)
        return
    chosen = trial.suggest_categorical(node.name, list(node.options))
    for field, item in node.options[chosen].items():
        if isinstance(item, (Param, NestedChoice)):
            collect(trial, item, values)
        else:
            put(values, field, item, f"{node.name}/{chosen}/{field}")


def put(values: dict[str, Any], field: str, value: Any, name: str) -> None:
    """values[field] = value, unless another parameter set it already (possible only in a space of any names)."""
    if field in values:
        raise ConfigError(f"parameter '{name}': sets '{field}', which another parameter of this trial set too; "
                          f"SearchSpace.suggest_nni(trial) gives each parameter its own place (NNI's nested form)")
    values[field] = value


def nni_value(trial: optuna.trial.BaseTrial, node: Node) -> Any:
    """A node's value as NNI's get_next_parameter gives it: a nested choice as {"_name": option, key: value, ...}."""
    if isinstance(node, Param):
        return sample(trial, node)
    chosen = trial.suggest_categorical(node.name, list(node.options))
    body = node.options[chosen]
    return {"_name": chosen, **{key: nni_value(trial, item) if isinstance(item, (Param, NestedChoice)) else item
                                for key, item in body.items()}}


@dataclass(frozen=True)
class SearchSpace:
    """A validated NNI search space whose values are sampled through an Optuna trial."""

    source: str  # file path or "<inline>"
    spec: dict[str, Any]  # the NNI dict as given
    nodes: tuple[Node, ...]

    @classmethod
    def from_file(cls, path: str | Path, fields: Mapping[str, Any] | Collection[str] | None = None) -> SearchSpace:
        """Load and validate a .json or .yaml/.yml space; errors name the file and key."""
        return cls.from_dict(read_config_file(path), str(path), fields)

    @classmethod
    def from_dict(cls, spec: dict[str, Any], source: str = "<inline>",
                  fields: Mapping[str, Any] | Collection[str] | None = None) -> SearchSpace:
        """Validate a space; `fields` (names, or names to types) limits which config fields it may set."""
        if fields is None or isinstance(fields, Mapping):
            known = None if fields is None else dict(fields)
        else:
            known = dict.fromkeys(fields, UNTYPED)
        if spec == {}:
            raise ConfigError(f"{source}: expected at least one parameter {{name: {{_type, _value}}}}, got an empty "
                              f"space (its trials would all train the base config)")
        return cls(source, spec, tuple(parse_mapping(Checker(source, known), spec, "")))

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Sample every parameter: a flat {config field: value} (a nested choice's option sets its keys)."""
        values: dict[str, Any] = {}
        for node in self.nodes:
            collect(trial, node, values)
        return values

    def suggest_nni(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Sample every parameter in the form of NNI's `get_next_parameter()`: each key of the space keeps its
        value, a nested choice {"_name": the option, its keys: values}. The same draws as `suggest`."""
        return {key: nni_value(trial, node) for key, node in zip(self.spec, self.nodes)}

    def choice_names(self) -> list[str]:
        """The Optuna names of the nested choices (e.g. `arch`, `arch/wide/block`): their values name an option."""
        names: list[str] = []

        def walk(node: Node) -> None:
            if isinstance(node, NestedChoice):
                names.append(node.name)
                for body in node.options.values():
                    for item in body.values():
                        if isinstance(item, (Param, NestedChoice)):
                            walk(item)

        for node in self.nodes:
            walk(node)
        return names

    def names(self) -> list[str]:
        """The config fields the space can set, nested ones included."""
        return [field for node in self.nodes for field in node_fields(node)]


# What every trial of a study is measured on, so that their accuracies compare and the test set never picks the
# best: the study's options or base config set these, never a parameter of the space.
STUDY_FIELDS = ("dataset", "data_dir", "subset", "holdout")


def trial_space(spec: dict[str, Any], source: str) -> SearchSpace:
    """A validated space of HPO trials: its keys are TrainConfig fields other than STUDY_FIELDS."""
    from effcifar.train import TrainConfig

    space = SearchSpace.from_dict(spec, source, field_types(TrainConfig))
    for field in STUDY_FIELDS:
        if field in space.names():
            raise ConfigError(f"{source}: key '{field}': the data every trial is measured on, not a parameter: set "
                              f"it in the trials' base config (--config) or with --{field.replace('_', '-')}")
    return space
