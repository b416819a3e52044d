"""Architecture spaces declared in data, NNI-style choice modules, and the SPOS supernet.

A space is a stem followed by stages. Each stage has a downsampling `conv1` choice, body
convolutions `conv2`…`convN` (each a choice), and a `skip` choice saying which body output is
added back to conv1's output: `zero` (no body at all), `conv3_input` (after conv2),
`conv4_input` (after conv3), … or `convN_output` (after the whole body). Every choice has a
stable key such as `stage1.conv1` or `stage2.skip`; an architecture is a dict key -> candidate.

The supernet holds every candidate; `set_arch` selects one per key and the forward pass runs
only the chosen ops (body convolutions past the chosen skip depth are not run). The same
class builds a standalone network from a space fixed to one architecture (`ArchSpace.fix`),
whose parameters are exactly those of the chosen ops and keep the supernet's names.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from effcifar.config import read_config_file, read_json
from effcifar.errors import ConfigError
from effcifar.models import STAGES, Scale, count_flops, count_parameters

Arch = dict[str, str]


@dataclass(frozen=True)
class OpSpec:
    """A conv-BN-ReLU op: kernel size, stride, and whether a 2x2 max-pool follows."""

    kernel: int
    stride: int = 1
    pool: bool = False

    @property
    def downsamples(self) -> bool:
        return self.stride == 2 or self.pool


OPS: dict[str, OpSpec] = {
    "conv3": OpSpec(3),
    "conv5": OpSpec(5),
    "conv3_pool": OpSpec(3, pool=True),
    "conv5_pool": OpSpec(5, pool=True),
    "conv3_stride2": OpSpec(3, stride=2),
    "conv5_stride2": OpSpec(5, stride=2),
}
DOWNSAMPLING_OPS = [name for name, op in OPS.items() if op.downsamples]
SAME_SIZE_OPS = [name for name, op in OPS.items() if not op.downsamples]

SEED_SPACE: dict[str, Any] = {
    "stem": {"op": "conv3", "width": "prep"},
    "stages": [
        {
            "name": f"stage{i}", "width": f"layer{i}",
            "conv1": ["conv3_pool", "conv5_pool", "conv3_stride2", "conv5_stride2"],
            "conv2": ["conv3", "conv5"], "conv3": ["conv3", "conv5"], "conv4": ["conv3", "conv5"],
            "skip": ["zero", "conv3_input", "conv4_input", "conv4_output"],
        }
        for i in (1, 2, 3)
    ],
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_SKIP = re.compile(r"conv(\d+)_(input|output)$")


def make_op(name: str, c_in: int, c_out: int) -> nn.Sequential:
    """The module of op `name` (see OPS) from c_in to c_out channels."""
    op = OPS[name]
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, op.kernel, stride=op.stride, padding=op.kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if op.pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def skip_depth(name: str) -> int:
    """How many body convs a skip candidate needs: zero -> 0, conv3_input -> 1, conv3_output -> 2."""
    if name == "zero":
        return 0
    match = _SKIP.match(name)
    if not match:
        raise ValueError(name)
    index, side = int(match.group(1)), match.group(2)
    return index - 2 if side == "input" else index - 1


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name (the key prefix), width, and the candidates of each choice."""

    name: str
    width: str | int
    conv1: tuple[str, ...]
    body: tuple[tuple[str, ...], ...]  # conv2, conv3, ... candidates
    skip: tuple[str, ...]

    def choices(self) -> dict[str, tuple[str, ...]]:
        """Choice key -> candidates, in declaration order."""
        out = {f"{self.name}.conv1": self.conv1}
        for i, candidates in enumerate(self.body):
            out[f"{self.name}.conv{i + 2}"] = candidates
        out[f"{self.name}.skip"] = self.skip
        return out


@dataclass(frozen=True)
class ArchSpace:
    """A declared architecture space: stem op and width, then the stages."""

    stem_op: str
    stem_width: str | int
    stages: tuple[StageSpec, ...]

    @classmethod
    def seed(cls) -> ArchSpace:
        """The seed's SPOS space (Efficient-CIFAR-Series): 3 stages, 15 choices."""
        return cls.from_dict(SEED_SPACE, "the seed space")

    @classmethod
    def load(cls, spec: str | Path | None) -> ArchSpace:
        """'seed' (or None) for the seed's space, else a YAML/JSON space file."""
        if spec is None or str(spec) == "seed":
            return cls.seed()
        return cls.from_file(spec)

    @classmethod
    def from_file(cls, path: str | Path) -> ArchSpace:
        """Read a YAML (or JSON) space declaration; a key given twice is an error."""
        return cls.from_dict(read_config_file(path), str(path))

    @classmethod
    def from_dict(cls, spec: Any, source: str = "space") -> ArchSpace:
        """Validate a space declaration; errors name the source and the field."""
        def fail(field: str, expected: str, value: Any) -> ConfigError:
            return ConfigError(f"{source}: field '{field}': expected {expected}, got {value!r}")

        if not isinstance(spec, Mapping):
            raise fail("(top level)", "a mapping with 'stem' and 'stages'", spec)
        unknown = set(spec) - {"stem", "stages"}
        if unknown:
            raise fail(sorted(unknown)[0], "only 'stem' and 'stages'", spec[sorted(unknown)[0]])
        stem = spec.get("stem", {"op": "conv3", "width": "prep"})
        if not isinstance(stem, Mapping) or set(stem) - {"op", "width"}:
            raise fail("stem", "a mapping with 'op' and 'width'", stem)
        stem_op = stem.get("op", "conv3")
        if stem_op not in SAME_SIZE_OPS:
            raise fail("stem.op", f"one of {SAME_SIZE_OPS}", stem_op)
        stem_width = _width(stem.get("width", "prep"), "stem.width", fail)
        stages_spec = spec.get("stages")
        if not isinstance(stages_spec, list) or not stages_spec:
            raise fail("stages", "a non-empty list of stages", stages_spec)
        stages, names = [], set()
        for i, stage in enumerate(stages_spec):
            parsed = _stage(stage, f"stages[{i}]", fail)
            if parsed.name in names:
                raise fail(f"stages[{i}].name", "a stage name not used before (choice keys must be unique)", parsed.name)
            names.add(parsed.name)
            stages.append(parsed)
        return cls(stem_op, stem_width, tuple(stages))

    def to_dict(self) -> dict[str, Any]:
        """The declaration, loadable again with `from_dict`."""
        stages = []
        for s in self.stages:
            entry: dict[str, Any] = {"name": s.name, "width": s.width, "conv1": list(s.conv1)}
            for i, candidates in enumerate(s.body):
                entry[f"conv{i + 2}"] = list(candidates)
            entry["skip"] = list(s.skip)
            stages.append(entry)
        return {"stem": {"op": self.stem_op, "width": self.stem_width}, "stages": stages}

    def choices(self) -> dict[str, list[str]]:
        """Every choice key -> its candidates, in order (the NAS search space)."""
        return {k: list(v) for s in self.stages for k, v in s.choices().items()}

    def size(self) -> int:
        """Number of distinct architectures (key assignments)."""
        total = 1
        for candidates in self.choices().values():
            total *= len(candidates)
        return total

    def check(self, arch: Mapping[str, str], source: str = "architecture") -> Arch:
        """The architecture as a plain dict if it names one candidate of this space per key."""
        choices = self.choices()
        missing = [k for k in choices if k not in arch]
        extra = [k for k in arch if k not in choices]
        if missing or extra:
            detail = f"missing {missing}" if missing else f"unknown keys {extra}"
            raise ConfigError(f"{source}: does not match the space ({detail}; keys are {list(choices)})")
        for key, candidates in choices.items():
            if arch[key] not in candidates:
                raise ConfigError(f"{source}: field '{key}': expected one of {candidates}, got {arch[key]!r}")
        return {k: arch[k] for k in choices}

    def active_keys(self, arch: Mapping[str, str]) -> list[str]:
        """Keys whose choice is computed: body convs beyond the skip depth are not."""
        keys = []
        for s in self.stages:
            depth = skip_depth(arch[f"{s.name}.skip"])
            keys.append(f"{s.name}.conv1")
            keys += [f"{s.name}.conv{i + 2}" for i in range(depth)]
            keys.append(f"{s.name}.skip")
        return keys

    def restrict(self, choices: Mapping[str, Sequence[str]]) -> ArchSpace:
        """The same space with each key limited to the given candidates (for shrinking)."""
        stages = []
        for s in self.stages:
            keep = {k: tuple(c for c in v if c in choices[k]) for k, v in s.choices().items()}
            if not all(keep.values()):
                empty = next(k for k, v in keep.items() if not v)
                raise ConfigError(f"restricting the space: key '{empty}' would have no candidate left")
            body = tuple(keep[f"{s.name}.conv{i + 2}"] for i in range(len(s.body)))
            stages.append(StageSpec(s.name, s.width, keep[f"{s.name}.conv1"], body, keep[f"{s.name}.skip"]))
        return ArchSpace(self.stem_op, self.stem_width, tuple(stages))

    def fix(self, arch: Mapping[str, str]) -> ArchSpace:
        """The one-architecture space of a standalone network: chosen ops only, unused body convs dropped."""
        arch = self.check(arch)
        stages = []
        for s in self.stages:
            depth = skip_depth(arch[f"{s.name}.skip"])
            body = tuple((arch[f"{s.name}.conv{i + 2}"],) for i in range(depth))
            stages.append(StageSpec(s.name, s.width, (arch[f"{s.name}.conv1"],), body, (arch[f"{s.name}.skip"],)))
        return ArchSpace(self.stem_op, self.stem_width, tuple(stages))

    def to_nni(self) -> dict[str, Any]:
        """NNI's classic one-shot search-space JSON (`nnictl ss_gen` format)."""
        out: dict[str, Any] = {}
        for key, candidates in self.choices().items():
            if key.endswith(".skip"):
                out[key] = {"_type": "input_choice", "_value": {"candidates": candidates, "n_chosen": 1}}
            else:
                out[key] = {"_type": "layer_choice", "_value": candidates}
        return out


def _width(value: Any, field: str, fail: Any) -> str | int:
    if isinstance(value, bool) or not (value in STAGES or (isinstance(value, int) and value > 0)):
        raise fail(field, f"a positive channel count or one of {list(STAGES)} (taken from the hyper-parameters)", value)
    return value


def _candidates(value: Any, field: str, allowed: Sequence[str], fail: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise fail(field, "a non-empty list of candidates", value)
    for i, name in enumerate(value):
        if name not in allowed:
            raise fail(f"{field}[{i}]", f"one of {list(allowed)}", name)
    if len(set(value)) != len(value):
        raise fail(field, "candidates without repeats", value)
    return tuple(value)


def _stage(stage: Any, where: str, fail: Any) -> StageSpec:
    if not isinstance(stage, Mapping):
        raise fail(where, "a mapping with name, width, conv1, conv2…, skip", stage)
    name = stage.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail(f"{where}.name", "an identifier (letters, digits, underscore)", name)
    body_fields = [k for k in stage if re.fullmatch(r"conv\d+", k) and k != "conv1"]
    n_body = len(body_fields)
    expected_fields = {"name", "width", "conv1", "skip"} | {f"conv{i + 2}" for i in range(n_body)}
    for key in stage:
        if key not in expected_fields:
            raise fail(f"{where}.{key}", f"fields name, width, conv1, conv2…conv{n_body + 1} (consecutive), skip", key)
    for key in ("conv1", "skip"):
        if key not in stage:
            raise fail(f"{where}.{key}", "a list of candidates", None)
    conv1 = _candidates(stage["conv1"], f"{where}.conv1", DOWNSAMPLING_OPS, fail)
    body = tuple(
        _candidates(stage[f"conv{i + 2}"], f"{where}.conv{i + 2}", SAME_SIZE_OPS, fail) for i in range(n_body)
    )
    skip_names = ["zero"] + [f"conv{k}_input" for k in range(3, n_body + 3)] + [f"conv{k}_output" for k in range(2, n_body + 2)]
    skip = _candidates(stage["skip"], f"{where}.skip", skip_names, fail)
    return StageSpec(name, _width(stage.get("width"), f"{where}.width", fail), conv1, body, skip)


# ---------------------------------------------------------------------------------------------
# Choice modules and the supernet


class LayerChoice(nn.Module):
    """One of several candidate modules, picked by `chosen` (NNI's LayerChoice, single path)."""

    def __init__(self, key: str, candidates: Mapping[str, nn.Module]):
        super().__init__()
        self.key = key
        self.candidates = nn.ModuleDict(candidates)
        self.chosen: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.candidates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chosen is None:
            raise RuntimeError(f"{self.key}: no candidate chosen; call set_arch first")
        return self.candidates[self.chosen](x)


class InputChoice(nn.Module):
    """Picks one of several inputs by name (NNI's InputChoice with n_chosen=1)."""

    def __init__(self, key: str, names: Sequence[str]):
        super().__init__()
        self.key = key
        self.names = list(names)
        self.chosen: str | None = None

    @property
    def chosen_index(self) -> int:
        if self.chosen is None:
            raise RuntimeError(f"{self.key}: no input chosen; call set_arch first")
        return self.names.index(self.chosen)

    def forward(self, inputs: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        return inputs[self.chosen_index]


class SearchStage(nn.Module):
    """conv1 (downsampling), body convs, and the skip that adds a body output back to conv1's."""

    def __init__(self, spec: StageSpec, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = LayerChoice(f"{spec.name}.conv1", {op: make_op(op, c_in, c_out) for op in spec.conv1})
        self.body = nn.ModuleDict({
            f"conv{i + 2}": LayerChoice(f"{spec.name}.conv{i + 2}", {op: make_op(op, c_out, c_out) for op in ops})
            for i, ops in enumerate(spec.body)
        })
        self.skip = InputChoice(f"{spec.name}.skip", spec.skip)
        self.depths = [skip_depth(name) for name in spec.skip]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        depth = self.depths[self.skip.chosen_index]
        taps = [x]  # taps[d]: the output after d body convs; only those needed are computed
        for conv in list(self.body.values())[:depth]:
            taps.append(conv(taps[-1]))
        skip = self.skip([taps[d] if 0 < d < len(taps) else None for d in self.depths])
        return x if skip is None else x + skip


def make_head(c_in: int, num_classes: int, logits_weight: float = 0.125) -> nn.Sequential:
    """The seed's head: global max-pool, bias-free linear, logits scale."""
    return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes, bias=False),
                         Scale(logits_weight))


def resolve_width(width: str | int, channels: Mapping[str, int]) -> int:
    """A stage width: a channel count, or the name of one in `channels` (the HPO widths)."""
    return channels[width] if isinstance(width, str) else width


class Supernet(nn.Module):
    """Stem, search stages, global max-pool, bias-free linear, logits scale (the seed's head)."""

    def __init__(self, space: ArchSpace, channels: Mapping[str, int], num_classes: int, logits_weight: float = 0.125):
        super().__init__()
        self.space = space
        c_in = resolve_width(space.stem_width, channels)
        self.prep = make_op(space.stem_op, 3, c_in)
        stages = {}
        for spec in space.stages:
            c_out = resolve_width(spec.width, channels)
            stages[spec.name] = SearchStage(spec, c_in, c_out)
            c_in = c_out
        self.stages = nn.ModuleDict(stages)
        self.head = make_head(c_in, num_classes, logits_weight)
        if space.size() == 1:  # a standalone network: its only architecture is always active
            self.set_arch({k: v[0] for k, v in space.choices().items()})

    def choice_modules(self) -> dict[str, LayerChoice | InputChoice]:
        """Choice key -> its module."""
        return {m.key: m for m in self.modules() if isinstance(m, (LayerChoice, InputChoice))}

    def set_arch(self, arch: Mapping[str, str]) -> None:
        """Select one candidate per key; later forwards run only that path."""
        arch = self.space.check(arch)
        for key, module in self.choice_modules().items():
            module.chosen = arch[key]

    def inactive_parameters(self) -> list[nn.Parameter]:
        """Parameters the current path does not use (unchosen candidates, body convs past the skip)."""
        unused = []
        for stage in self.stages.values():
            depth = stage.depths[stage.skip.chosen_index]
            for index, choice in enumerate([stage.conv1, *stage.body.values()]):
                for name, op in choice.candidates.items():
                    if name != choice.chosen or index > depth:
                        unused += list(op.parameters())
        return unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prep(x)
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)


def build_standalone(space: ArchSpace, arch: Mapping[str, str], channels: Mapping[str, int], num_classes: int,
                     logits_weight: float = 0.125) -> Supernet:
    """A network with only the chosen ops of `arch` (its parameter names match the supernet's)."""
    return Supernet(space.fix(arch), channels, num_classes, logits_weight)


# ---------------------------------------------------------------------------------------------
# Cost tables


IMAGE_SIZE = 32


@dataclass(frozen=True)
class Site:
    """Where a candidate runs: its choice key and name, channels in and out, input height and width."""

    key: str
    name: str
    c_in: int
    c_out: int
    size: int


def sites(space: ArchSpace, channels: Mapping[str, int]) -> list[Site]:
    """Every candidate of every choice with its input shape, so cost tables measure each op where it runs."""
    out = []
    c_in, size = resolve_width(space.stem_width, channels), IMAGE_SIZE
    for s in space.stages:
        c_out = resolve_width(s.width, channels)
        out += [Site(f"{s.name}.conv1", op, c_in, c_out, size) for op in s.conv1]
        size //= 2
        out += [Site(key, name, c_out, c_out, size)
                for key, names in list(s.choices().items())[1:] for name in names]
        c_in = c_out
    return out


def head_input(space: ArchSpace, channels: Mapping[str, int]) -> tuple[int, int]:
    """(channels, height and width) of what the head receives: the last stage's output."""
    return resolve_width(space.stages[-1].width, channels), IMAGE_SIZE >> len(space.stages)


def arch_key(space: ArchSpace, arch: Mapping[str, str]) -> str:
    """The canonical key of an architecture: its active choices only (inactive body convs do not count)."""
    return ",".join(f"{key}={arch[key]}" for key in space.active_keys(arch))


def distinct_random_archs(space: ArchSpace, count: int, rng: random.Random) -> list[Arch]:
    """Up to `count` uniformly random architectures that are different networks (distinct `arch_key`), in draw order.

    Fewer are returned when the space has fewer (after max(10,000, 100 x count) draws).
    """
    choices = space.choices()
    archs: dict[str, Arch] = {}
    for _ in range(max(10_000, 100 * count)):
        if len(archs) == count:
            break
        arch = {key: rng.choice(candidates) for key, candidates in choices.items()}
        archs.setdefault(arch_key(space, arch), arch)
    return list(archs.values())


def extreme_arch(costs: Mapping[str, Mapping[str, float]], space: ArchSpace, largest: bool) -> Arch:
    """The subnet of `space` with the largest or smallest additive cost (per-key costs over active keys).

    Deepest (shallowest) skip and costliest (cheapest) op per key; the cost is additive over
    active keys and a deeper skip only adds convs, so the per-key pick is the extreme.
    """
    pick = max if largest else min
    arch = {}
    for key, candidates in space.choices().items():
        if key.endswith(".skip"):
            arch[key] = pick(candidates, key=skip_depth)
        else:
            arch[key] = pick(candidates, key=lambda op, cost=costs[key]: cost[op])
    return arch


@dataclass(frozen=True)
class CostTable:
    """FLOPs and parameters of the fixed parts and of each candidate, computed once per space.

    A subnet's cost is the fixed part plus the candidates of its active keys; this equals a
    direct count of the standalone network (a test checks it), so limits can be applied to
    sampled paths without building them.
    """

    base_flops: int
    base_params: int
    flops: dict[str, dict[str, int]]
    params: dict[str, dict[str, int]]
    space: ArchSpace

    @classmethod
    def build(cls, space: ArchSpace, channels: Mapping[str, int], num_classes: int) -> CostTable:
        """Count every op once on the meta device (nothing is computed); skips cost nothing counted."""
        flops: dict[str, dict[str, int]] = {key: {} for key in space.choices()}
        params: dict[str, dict[str, int]] = {key: {} for key in space.choices()}
        for site in sites(space, channels):
            if site.key.endswith(".skip"):
                flops[site.key][site.name] = params[site.key][site.name] = 0
                continue
            module = make_op(site.name, site.c_in, site.c_out)
            flops[site.key][site.name] = count_flops(module, (1, site.c_in, site.size, site.size))
            params[site.key][site.name] = count_parameters(module)
        c_stem = resolve_width(space.stem_width, channels)
        stem = make_op(space.stem_op, 3, c_stem)
        c_last, _ = head_input(space, channels)
        base_flops = count_flops(stem, (1, 3, IMAGE_SIZE, IMAGE_SIZE)) + 2 * c_last * num_classes
        return cls(base_flops, count_parameters(stem) + c_last * num_classes, flops, params, space)

    def flops_of(self, arch: Mapping[str, str]) -> int:
        """Forward FLOPs of one image through the subnet."""
        return self.base_flops + sum(self.flops[k][arch[k]] for k in self.space.active_keys(arch))

    def params_of(self, arch: Mapping[str, str]) -> int:
        """Trainable parameters of the standalone subnet."""
        return self.base_params + sum(self.params[k][arch[k]] for k in self.space.active_keys(arch))

    def extreme(self, largest: bool, space: ArchSpace | None = None) -> Arch:
        """The subnet of `space` (default: the table's) with the most or fewest FLOPs."""
        return extreme_arch(self.flops, space or self.space, largest)


def nni_space_json(space: ArchSpace) -> str:
    """The NNI-format search-space JSON text."""
    return json.dumps(space.to_nni(), indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# Architecture files


def read_arch_file(path: str | Path) -> dict[str, Any]:
    """The JSON mapping of an architecture file; a ConfigError names the file."""
    path = Path(path)
    data = read_json(path, "architecture file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping {{choice key: candidate}} (or {{\"arch\": ...}}), "
                          f"got {type(data).__name__}")
    return data


def load_arch(path: str | Path, space: ArchSpace) -> Arch:
    """An architecture from `arch/top_K.json`, `architecture_final.json` or a plain NNI `{key: choice}` file.

    NNI's one-element lists (`["conv3"]`) are accepted for a choice; the result is checked
    against the space, and every problem is a ConfigError naming the file.
    """
    data = read_arch_file(path)
    if isinstance(data.get("arch"), dict):
        data = data["arch"]
    arch = {key: value[0] if isinstance(value, list) and len(value) == 1 else value for key, value in data.items()}
    return space.check(arch, str(path))


def load_arch_file(path: str | Path, space: str | Path | None = "seed") -> tuple[ArchSpace, Arch]:
    """(space, architecture) of an architecture file: its embedded "space" declaration, else `ArchSpace.load(space)`."""
    data = read_arch_file(path)
    if "space" in data:
        arch_space = ArchSpace.from_dict(data["space"], f"{path}: space")
    else:
        arch_space = ArchSpace.load(space)
    return arch_space, load_arch(path, arch_space)
