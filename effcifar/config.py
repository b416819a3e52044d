"""Typed configs from YAML/JSON files and command-line overrides, with errors that name the source.

Every stage has one dataclass config whose defaults are the documented recipe, composed of
shared parts (see `effcifar.train`). Fields that change where or how fast a run computes, not its
results, are declared with `execution(...)`; `fingerprint` is the one resume check of every stage
(train, HPO, supernet, search, retrain, pipeline). A config is built as: defaults < file < overrides;
a layer that sets a run's length alone scales the fields counted in its epochs (`keep_schedule_shape`).
A field declared with `nested(...)` holds a group of settings (TrainConfig's recipe fields, SupernetConfig's
sampler, ...), whose keys a layer gives flat or under the field's name; a class's `RENAMED_FIELDS` old keys are
accepted with a warning.
Unknown keys, values of the wrong type and non-finite numbers are errors naming the file (or option),
the field and what was expected; the dataclass's own `validate()` checks ranges and raises
`ConfigError` with `field` set, and the source of that field is prefixed here. Files that are not
UTF-8, not JSON/YAML or nested too deeply are one-line errors naming them (`read_text`, `read_json`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import reprlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from effcifar.atomic import atomic_write
from effcifar.errors import ConfigError

C = TypeVar("C")
EXECUTION = "execution"  # field metadata key: the field does not change results
HELP = "help"  # field metadata key: what the field means, for --help and the docs
CHOICES = "choices"  # field metadata key: the values a field accepts, when they are a fixed list
NESTED = "nested"  # field metadata key: the field holds a group of settings (its class, or True), keys given flat


def setting(default: Any, help: str, choices: Sequence[str] = (), *, execution: bool = False) -> Any:
    """A config field with its meaning (`help`, with the unit) and fixed `choices`, which `--help` shows."""
    return dataclasses.field(default=default, metadata={HELP: help, CHOICES: tuple(choices), EXECUTION: execution})


def execution(default: Any, help: str = "", choices: Sequence[str] = ()) -> Any:
    """A config field that changes where or how fast a run computes, never its results (free to change on resume)."""
    return setting(default, help, choices, execution=True)


def nested(help: str, group: type | None = None) -> Any:
    """A field holding a group of settings, so that a config's top level reads as what a user chooses.

    `group` is the dataclass of the settings (the default is an instance of it, which layers' keys build); without
    one the class lists the keys in `extra_field_types()` and converts their mapping (default None), as
    TrainConfig does for its recipe's fields. Layers give the keys flat (`whiten: false`) or under the field's name (`recipe_fields:
    {whiten: false}`, as saved configs do); each flat key belongs to one field or group only (`nested_keys`).
    """
    default: dict[str, Any] = {"default_factory": group} if group is not None else {"default": None}
    metadata = {HELP: help, CHOICES: (), EXECUTION: False, NESTED: group or True}
    return dataclasses.field(**default, metadata=metadata)


def field_help(field: dataclasses.Field) -> str:
    """A field's help text, its choices appended ("...; one of a, b")."""
    choices = field.metadata.get(CHOICES, ())
    return field.metadata.get(HELP, "") + (f"; one of {', '.join(choices)}" if choices else "")


def execution_fields(cls: Any) -> set[str]:
    """The names of a config class's (or instance's) `execution` fields, a group's among them by their flat key."""
    names = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get(EXECUTION):
            names.add(f.name)
        if isinstance(f.metadata.get(NESTED), type):
            names |= execution_fields(f.metadata[NESTED])
    return names


def result_values(config: Any, flat: bool = False) -> dict[str, Any]:
    """A config's fields that change its results (all but the `execution` ones), as plain data; with `flat`, a
    group's keys flat (what a config recorded before its settings were grouped, so its fingerprint stays)."""
    skip = execution_fields(config)
    values = flat_values(config) if flat else dataclasses.asdict(config)
    return {k: v for k, v in values.items() if k not in skip}


def fingerprint(values: Any) -> str:
    """The resume check of every stage: a short hash of what a result depends on.

    A config dataclass counts by its `result_values`; plain data (a stage's settings) as it is.
    """
    if dataclasses.is_dataclass(values):
        values = result_values(values)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two (nested) mappings."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


SHOWN_CHARS = 100  # of a value quoted in an error: a huge one must not become a huge message


def shown(value: Any) -> str:
    """`repr(value)` for an error message, at most SHOWN_CHARS long (built without the full repr of a huge value)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, SHOWN_CHARS, SHOWN_CHARS
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 8


def field_error(field: str, expected: str, value: Any) -> ConfigError:
    """A ConfigError about one field, for `validate()` methods; the caller adds the source."""
    err = ConfigError(f"field '{field}': expected {expected}, got {shown(value)}")
    err.field = field  # type: ignore[attr-defined]
    return err


MAX_SEED = 2**32 - 1  # numpy's seeds are 0..2**32-1


def check_threads(field: str, threads: int) -> None:
    """0 (torch's default) up to 4 per CPU core of this machine, else a ConfigError with `field`: far more threads
    than cores only slows a run down, and torch fails or stalls on thousands."""
    most = 4 * (os.cpu_count() or 1)
    if not 0 <= threads <= most:
        raise field_error(field, f"0 (torch's default) to {most} threads on this machine", threads)


def check_seed(field: str, seed: int | None) -> None:
    """A seed numpy, torch and Optuna all accept (None: unseeded), else a ConfigError with `field`."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise field_error(field, f"a seed in 0..{MAX_SEED}", seed)


_warned: set[str] = set()  # deprecated names already warned about by this process


def warn_deprecated(old: str, new: str, where: str = "") -> None:
    """One line on stderr, once per process and name, when an old name is used for a renamed option or field
    (`where`: the file or option that used it first)."""
    if old not in _warned:
        _warned.add(old)
        print(f"effcifar: warning: {where + ': ' if where else ''}{old} is deprecated (it still works for now): "
              f"use {new}", file=sys.stderr)


def renamed_fields(cls: type) -> dict[str, str]:
    """A config class's old field names -> the current ones (`RENAMED_FIELDS`), accepted with a warning."""
    return getattr(cls, "RENAMED_FIELDS", {})


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each key a layer of a config dataclass may set: its fields (a `nested` one as a
    mapping, followed by its keys) and the keys its `extra_field_types()` adds (TrainConfig: old names)."""
    hints, groups = typing.get_type_hints(cls), nested_keys(cls)
    types_: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        types_[f.name] = dict if f.metadata.get(NESTED) else hints[f.name]
        types_.update(groups.get(f.name, {}))
    extra = getattr(cls, "extra_field_types", None)
    return {**types_, **extra()} if extra is not None else types_


def nested_names(cls: type) -> list[str]:
    """The names of a config class's `nested` fields."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get(NESTED)]


def group_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """(field, group dataclass) of each `nested` field of a config class that declares its group."""
    return [(f, f.metadata[NESTED]) for f in dataclasses.fields(cls) if isinstance(f.metadata.get(NESTED), type)]


def nested_keys(cls: type) -> dict[str, dict[str, Any]]:
    """Each `nested` field of a config class -> the keys (with their types) that a layer gives flat for it.

    A group's keys are its dataclass's fields; a field without one holds the class's `extra_field_types()` that
    are not old names (TrainConfig: every recipe's own fields). A key of two groups, or of a group and a field,
    could not say where its value goes: a TypeError, for the class's author.
    """
    owner = {f.name: cls.__name__ for f in dataclasses.fields(cls)}
    groups: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(cls):
        group = f.metadata.get(NESTED)
        if not group:
            continue
        if isinstance(group, type):
            groups[f.name] = field_types(group)
        else:
            groups[f.name] = {k: v for k, v in cls.extra_field_types().items() if k not in renamed_fields(cls)}
        for key in groups[f.name]:
            if key in owner:
                raise TypeError(f"{cls.__name__}: key {key!r} belongs to both {owner[key]} and {f.name}")
            owner[key] = f.name
    return groups


def check_types(config: Any) -> None:
    """A ConfigError (with `field`) for the first field, its `nested` groups' included, whose value is not of its
    declared type: a config built in Python (`TrainConfig(epochs="3")`, `tta="false"`) is refused as a file or an
    option with that value would be, instead of failing deep in a run or meaning something else."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get(NESTED):
            if dataclasses.is_dataclass(value):
                check_types(value)
            continue
        try:
            coerce_value(hints[f.name], value)
        except ValueError as e:
            raise field_error(f.name, str(e), value) from None


def flat_values(config: Any) -> dict[str, Any]:
    """A config's values as plain data, its `nested` fields' keys flat (as files and options give them)."""
    values = dataclasses.asdict(config)
    for name in nested_names(type(config)):
        values.update(values.pop(name))
    return values


def renamed_key(cls: type, key: str, source: str) -> str:
    """The field an old key of `cls.RENAMED_FIELDS` stands for (a one-line warning, once per process), else `key`."""
    new = renamed_fields(cls).get(key)
    if new is None:
        return key
    warn_deprecated(f"field '{key}'", f"'{new}'", source)
    return new


def base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, None allowed) for annotations like int, float, str | None."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def coerce_value(annotation: Any, value: Any, from_text: bool = False) -> Any:
    """Check (and, for command-line text, parse) one value; raise ValueError with what was expected."""
    kind, optional = base_type(annotation)
    if value is None or (from_text and optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"a value of type {kind.__name__}")
    if isinstance(value, str) and any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValueError("text on one line without control characters (a NUL, a newline, ...)")
    if from_text and isinstance(value, (dict, list)):  # e.g. --set train.layer1.x=1: a path below a single value
        raise ValueError(f"a single value of type {kind.__name__} (it has no fields below it)")
    if from_text and isinstance(value, str):  # text to parse; a value given typed is checked as it is
        if kind is bool:
            if value.lower() in ("true", "yes", "1", "on"):
                return True
            if value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError("true or false")
        try:
            value = kind(value)
        except ValueError:
            raise ValueError(f"a value of type {kind.__name__}") from None
        if kind is float and not math.isfinite(value):
            raise ValueError("a finite number")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"a value of type {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise ValueError("a finite number")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping with the same key twice (PyYAML keeps the last silently), and aliases:
    a few nested aliases of aliases expand a file of a few hundred bytes into gigabytes."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed, at line "
                                                          f"{event.start_mark.line + 1}; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats: PyYAML follows YAML 1.1, where 5e-4 and 1E+3 (no dot) are strings, and a config's
# `base_wd: 5e-4` would be refused as text.
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)$"), list("-+0123456789."))


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook that rejects a key given twice."""
    keys = [k for k, _ in pairs]
    duplicate = next((k for k in keys if keys.count(k) > 1), None)
    if duplicate is not None:
        raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's content; a ConfigError names the file if it cannot be read or is not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is not text
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        byte = f"byte 0x{e.object[e.start]:02x} at offset {e.start}"
        raise ConfigError(f"{path}: not a UTF-8 text {what} ({byte})") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """The data of a JSON file (a run's summary, marker, results); a ConfigError names the file and the problem."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None


def read_yaml(text: str) -> Any:
    """YAML data, safely (no tags that build objects); a key given twice is a ValueError."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping (a key given twice is an error); errors name the file."""
    path = Path(path)
    text = read_text(path, "config file")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        try:
            data = json.loads(text, object_pairs_hook=_unique_pairs) if kind == "JSON" else read_yaml(text)
        except json.JSONDecodeError as e:  # as NNI reads a .json file: YAML next (JSON with # comments)
            try:
                data = read_yaml(text)
            except (yaml.YAMLError, ValueError):
                raise e from None
    except yaml.MarkedYAMLError as e:  # the problem and where, not only PyYAML's first line ("while scanning ...")
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {e.problem or e.context}{where}") from None
    except (json.JSONDecodeError, yaml.YAMLError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid {kind}: {first_line}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid {kind}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field names to values, got {type(data).__name__}")
    return data


def build_config(
    cls: type[C], file: str | Path | None = None, overrides: dict[str, Any] | None = None,
    overrides_from_text: bool = False, override_source: str = "command line",
    base: tuple[str, dict[str, Any]] | None = None,
) -> C:
    """Defaults < base (source, values) < file < overrides, type-checked and validated.

    Errors name the source and field. `base` is an extra layer under the file, e.g. the
    hyper-parameters a search found. A class with a `recipe_defaults(values)` classmethod gets
    its result as the defaults of the fields that no layer set (TrainConfig's `recipe`).
    """
    layers = [(base[0], base[1], False)] if base is not None else []
    if file is not None:
        layers.append((str(file), read_config_file(file), False))
    if overrides:
        layers.append((override_source, overrides, overrides_from_text))
    return build_from_layers(cls, layers)


def build_from_layers(cls: type[C], layers: list[tuple[str, Mapping[str, Any], bool]]) -> C:
    """Defaults < each (source, values, values are command-line text) layer in turn, checked as build_config does."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    steps: list[tuple[set[str], dict[str, Any]]] = []  # (the fields a layer set, all values after it)
    for source, mapping, from_text in layers:
        layer = read_layer(cls, source, mapping, from_text)
        values.update(layer)
        origin.update(dict.fromkeys(layer, source))
        steps.append((set(layer), dict(values)))
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    presets = getattr(cls, "recipe_defaults", None)  # e.g. TrainConfig: `recipe` changes unset fields' defaults
    try:
        if presets is not None:
            preset = presets(values)
            origin.update({key: f"recipe {values.get('recipe')!r} defaults" for key in preset if key not in values})
            values = {**preset, **values}
            defaults.update(preset)
        keep_schedule_shape(cls, steps, defaults, values, origin)
        config = cls(**group_values(cls, values))
        config.validate()  # type: ignore[attr-defined]
    except ConfigError as e:
        source = origin.get(getattr(e, "field", ""), "default config")
        raise ConfigError(f"{source}: {e}") from None
    return config


def group_values(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat checked values as `cls(**...)` takes them: each group's keys in its field (a group's dataclass built,
    a group without one as a mapping, which the class converts)."""
    values, groups = dict(values), nested_keys(cls)
    for f in dataclasses.fields(cls):
        if f.name in groups:
            given = {key: values.pop(key) for key in list(values) if key in groups[f.name]}
            group = f.metadata[NESTED]
            values[f.name] = group(**given) if isinstance(group, type) else given
    return values


def read_layer(cls: type, source: str, mapping: Mapping[str, Any], from_text: bool) -> dict[str, Any]:
    """One layer's values, each checked against its field's type: a group's keys flat, old names mapped."""
    types_, groups = field_types(cls), nested_keys(cls)
    values: dict[str, Any] = {}
    for key, value in layer_items(source, mapping, groups):
        key = renamed_key(cls, key, source)
        if key not in types_ or key in groups:
            known = [k for k in types_ if k not in renamed_fields(cls)]
            raise ConfigError(f"{source}: unknown field {shown(key)} (known fields: {', '.join(known)})")
        if key in values:
            raise ConfigError(f"{source}: field '{key}': given twice (under its old name or its group too)")
        try:
            values[key] = coerce_value(types_[key], value, from_text=from_text)
        except ValueError as e:
            raise ConfigError(f"{source}: field '{key}': expected {e}, got {shown(value)}") from None
    return values


def layer_items(source: str, mapping: Mapping[str, Any], groups: Mapping[str, Mapping[str, Any]],
                ) -> list[tuple[str, Any]]:
    """A layer's (key, value) pairs with each group's keys flat, whether given flat or under the group's name."""
    items = []
    for key, value in mapping.items():
        if key not in groups:
            items.append((key, value))
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. vars(config): the instance
            value = dataclasses.asdict(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: field '{key}': expected a mapping of field names to values, got "
                              f"{shown(value)}")
        stray = next((k for k in value if k not in groups[key]), None)
        if stray is not None:
            raise ConfigError(f"{source}: unknown field '{key}.{stray}' (known fields of {key}: "
                              f"{', '.join(groups[key])})")
        items += list(value.items())
    return items


def keep_schedule_shape(cls: type, steps: list[tuple[set[str], dict[str, Any]]], defaults: Mapping[str, Any],
                        values: dict[str, Any], origin: dict[str, str]) -> None:
    """Scale the fields counted in epochs of a run's length when a layer sets the length but not them.

    `cls.schedule_fields()` maps a length field to those fields (TrainConfig: epochs -> peak_epoch,
    airbench's whiten_bias_epochs). They keep the fraction of the run they had in the layers below (or
    in the defaults), so `--epochs 12` alone moves the peak with it; integer fields round to at least 1.
    A field without a value below (a default of None, or not a field of the chosen recipe) is left alone.
    """
    kinds = field_types(cls)
    schedule = getattr(cls, "schedule_fields", dict)()

    def last_set(name: str) -> int | None:
        return next((i for i in reversed(range(len(steps))) if name in steps[i][0]), None)

    for length, shaped in schedule.items():
        length_layer = last_set(length)
        if length_layer is None:
            continue
        for name in shaped:
            layer = last_set(name)
            if layer is not None and layer >= length_layer:
                continue
            below = steps[layer][1] if layer is not None else {}
            old_value, old_length = below.get(name, defaults.get(name)), below.get(length, defaults[length])
            if old_value is None or old_length <= 0:
                continue
            scaled = old_value * values[length] / old_length
            if base_type(kinds[name])[0] is int:
                scaled = max(1, math.floor(scaled + 0.5)) if old_value > 0 else 0
            values[name] = float(f"{scaled:.12g}") if isinstance(scaled, float) else scaled  # 2.3/10: 0.23
            origin[name] = f"{origin[length]} ({name} scaled with {length})"


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass, ready for YAML/JSON."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), loadable again with `build_config`."""
    atomic_write(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
