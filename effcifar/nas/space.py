"""Architecture spaces declared in data, NNI-style choice modules, and the SPOS supernet.

A space is a stem, stages and a head. Each stage has a downsampling `conv1` choice and body
layers `conv2`…`convN` (each a choice). With a `skip` choice, the stage adds one body output
back to conv1's output: `zero` (no body at all), `conv3_input` (after conv2), `conv4_input`
(after conv3), … or `convN_output` (after the whole body) — the seed's SPOS space. Without
one, the body layers run in sequence (a MobileNet-style macro space, such as NAS-Bench-Macro's).
Every choice has a stable key such as `stage1.conv1` or `stage2.skip`; an architecture is a
dict key -> candidate. Ops are named by a small grammar (see `op_spec`): `conv3`, `conv5_pool`,
`mb6_k5`, `mb3_k3_stride2`, `identity`, `identity_stride2`, ...

The supernet holds every candidate; `set_arch` selects one per key and the forward pass runs
only the chosen ops (body convolutions past the chosen skip depth are not run). The same
class builds a standalone network from a space fixed to one architecture (`ArchSpace.fix`),
whose parameters are exactly those of the chosen ops and keep the supernet's names.

Width choices (OFA/BigNAS elastic channels): a stage may declare `widths` beside its `width`,
adding the key `stageN.width`. Its candidates are either channel counts (`[16, 24, 32]`, the
candidates "16", "24", "32") or fractions of the stage's width (`["0.5x", "0.75x", "1x"]`), one kind
per stage; fractions are what a width named after a hyper-parameter (`layer1`) needs. Each must
come to a whole number of channels no larger than the stage's width (checked where the width is
resolved). The supernet builds the stage's ops at its largest candidate and a path of width w
runs the first w output channels of each conv (and the first input channels it receives), the
matching slice of BatchNorm's parameters and statistics, and the head's first columns: every
width shares the same weights. In an inverted residual (`mb*`) the expanded channels follow
the input (e x its channels) and the projection the stage's width.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from effcifar.config import read_config_file, read_json
from effcifar.errors import ConfigError
from effcifar.models import NETWORK_STAGES as STAGES, Scale, count_flops, count_parameters

Arch = dict[str, str]


@dataclass(frozen=True)
class OpSpec:
    """An op declared by its name: a conv-BN-ReLU, an inverted residual, or the identity, and how it downsamples."""

    family: str  # "conv", "mb" (MobileNetV2 inverted residual) or "identity"
    kernel: int = 1
    expansion: int = 1
    stride: int = 1
    pool: bool = False  # a 2x2 max-pool after the op (convs only)

    @property
    def downsamples(self) -> bool:
        return self.stride == 2 or self.pool


_OP_NAME = re.compile(r"(?:conv(?P<conv>\d+)|mb(?P<expansion>\d+)_k(?P<mb>\d+)|(?P<identity>identity))"
                      r"(?P<down>_pool|_stride2)?$")
OP_GRAMMAR = ("conv<k>, conv<k>_pool, conv<k>_stride2, mb<e>_k<k>, mb<e>_k<k>_stride2, identity, identity_stride2 "
              "(k odd, 1-9; e 1-8)")


@functools.lru_cache(maxsize=None)
def op_spec(name: str) -> OpSpec | None:
    """The op an op name declares, or None if the name does not follow the grammar (OP_GRAMMAR).

    `conv<k>`: k x k conv + BN + ReLU. `mb<e>_k<k>`: 1x1 expand to e x the input channels + BN +
    ReLU, k x k depthwise + BN + ReLU, 1x1 project + BN, plus the input when the shapes match
    (e = 1: no expand conv). `identity`: nothing, or a 1x1 conv + BN where the shape changes.
    `_stride2` strides the (depthwise) conv; `_pool` (convs only) adds a 2x2 max-pool.
    """
    match = _OP_NAME.match(name)
    if not match:
        return None
    down = match.group("down")
    stride, pool = (2 if down == "_stride2" else 1), down == "_pool"
    if match.group("identity"):
        return None if pool else OpSpec("identity", stride=stride)
    kernel = int(match.group("conv") or match.group("mb"))
    if kernel % 2 == 0 or not 1 <= kernel <= 9:
        return None
    if match.group("conv"):
        return OpSpec("conv", kernel, stride=stride, pool=pool)
    expansion = int(match.group("expansion"))
    return None if pool or not 1 <= expansion <= 8 else OpSpec("mb", kernel, expansion, stride)


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
# NAS-Bench-Macro (Su et al., CVPR 2021): 8 layers in 3 stages of 2, 3 and 3, each identity or an inverted
# residual; digit i of a table key is the candidate index of the i-th key below. The standalone network has
# exactly the benchmark's parameters (tests/test_nas_table.py checks the table's `params`).
MACRO_CANDIDATES = ["identity", "mb3_k3", "mb6_k5"]
NAS_BENCH_MACRO_SPACE: dict[str, Any] = {
    "stem": {"op": "conv3", "width": 32},
    "stages": [
        {"name": f"stage{i + 1}", "width": width, "conv1": [f"{op}_stride2" for op in MACRO_CANDIDATES],
         **{f"conv{j + 2}": MACRO_CANDIDATES for j in range(layers - 1)}}
        for i, (width, layers) in enumerate([(64, 2), (128, 3), (256, 3)])
    ],
    "head": {"conv": 1280, "pool": "avg", "bias": True, "scale_logits": False},
}
# The seed space with each stage's width searched too (at 0.5, 0.75 and 1 times the hyper-parameter width), so the
# search can trade channels for ops: ResNet-9 is no longer the only network at its cost.
SEED_WIDTHS_SPACE: dict[str, Any] = {
    "stem": SEED_SPACE["stem"],
    "stages": [{**stage, "widths": ["0.5x", "0.75x", "1x"]} for stage in SEED_SPACE["stages"]],
}
BUILTIN_SPACES = {"seed": SEED_SPACE, "seed-widths": SEED_WIDTHS_SPACE, "nas-bench-macro": NAS_BENCH_MACRO_SPACE}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_SKIP = re.compile(r"conv(\d+)_(input|output)$")
_FRACTION = re.compile(r"(\d+(?:\.\d+)?)x$")


class SlicedConv2d(nn.Conv2d):
    """A conv held at its largest width that runs its first `active_out` output channels (None: all) on the
    input channels it receives: the weights every width of an elastic stage shares. A depthwise conv runs one
    filter per input channel; with `expansion` the output is that many times the input's channels."""

    active_out: int | None = None
    expansion: int = 0  # an inverted residual's expansion conv: e x the input channels out (0: active_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if self.groups > 1:  # depthwise
            bias = None if self.bias is None else self.bias[:c]
            return F.conv2d(x, self.weight[:c], bias, self.stride, self.padding, self.dilation, c)
        out = c * self.expansion if self.expansion else self.active_out
        bias = None if self.bias is None else self.bias[:out]
        return self._conv_forward(x, self.weight[:out, :c], bias)


class SlicedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first channels of its largest width, as many as the input has; the running statistics
    of the slice are updated in place in the shared buffers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average (BN recalibration)
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        mean = self.running_mean[:c] if track and self.running_mean is not None else None
        var = self.running_var[:c] if track and self.running_var is not None else None
        weight = None if self.weight is None else self.weight[:c]
        bias = None if self.bias is None else self.bias[:c]
        return F.batch_norm(x, mean, var, weight, bias, use_batch, momentum, self.eps)


class SlicedLinear(nn.Linear):
    """A linear layer held at its largest input width that uses the first columns, as many as the input has."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, :x.shape[1]], self.bias)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + BN + ReLU, depthwise + BN + ReLU, 1x1 project + BN (+ input).

    `sliced`: elastic (see SlicedConv2d): the expansion and depthwise convs run on e x the input's
    channels, the projection on the stage's chosen width.
    """

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int, sliced: bool = False):
        super().__init__()
        conv, norm = (SlicedConv2d, SlicedBatchNorm2d) if sliced else (nn.Conv2d, nn.BatchNorm2d)
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            expand = conv(c_in, hidden, 1, bias=False)
            expand.expansion = expansion
            layers += [expand, norm(hidden), nn.ReLU(inplace=True)]
        layers += [
            conv(hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden, bias=False),
            norm(hidden), nn.ReLU(inplace=True),
            conv(hidden, c_out, 1, bias=False), norm(c_out),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def make_op(name: str, c_in: int, c_out: int, sliced: bool = False) -> nn.Module:
    """The module of op `name` (see `op_spec`) from c_in to c_out channels; `sliced`: with the modules of an
    elastic stage (SlicedConv2d, SlicedBatchNorm2d)."""
    op = op_spec(name)
    if op is None:
        raise ValueError(f"not an op name: {name!r} (expected {OP_GRAMMAR})")
    conv, norm = (SlicedConv2d, SlicedBatchNorm2d) if sliced else (nn.Conv2d, nn.BatchNorm2d)
    if op.family == "mb":
        return InvertedResidual(c_in, c_out, op.expansion, op.kernel, op.stride, sliced)
    if op.family == "identity":
        if op.stride == 1 and c_in == c_out:
            return nn.Identity()
        return nn.Sequential(conv(c_in, c_out, 1, stride=op.stride, bias=False), norm(c_out))
    layers: list[nn.Module] = [
        conv(c_in, c_out, op.kernel, stride=op.stride, padding=op.kernel // 2, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
    ]
    if op.pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class HeadSpec:
    """The classifier after the last stage: optional 1x1 conv + BN + ReLU, global pool, linear, logits scale.

    The default is the seed's (global max-pool, bias-free linear, the config's `logits_weight`);
    NAS-Bench-Macro's is a 1x1 conv to 1280 channels, average pool and a linear layer with bias.
    """

    conv: int | None = None  # channels of the 1x1 conv before pooling; None: no conv
    pool: str = "max"  # "max" or "avg"
    bias: bool = False  # of the linear layer
    scale_logits: bool = True  # multiply the logits by the config's logits_weight

    def to_dict(self) -> dict[str, Any]:
        return {"conv": self.conv, "pool": self.pool, "bias": self.bias, "scale_logits": self.scale_logits}


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
    """One stage: its name (the key prefix), width, and the candidates of each choice.

    An empty `skip` means the stage has no skip choice: its body layers all run, in sequence. An empty
    `widths` means the stage runs at `width`; else `width` is the largest a width candidate may be.
    """

    name: str
    width: str | int
    conv1: tuple[str, ...]
    body: tuple[tuple[str, ...], ...]  # conv2, conv3, ... candidates
    skip: tuple[str, ...]
    widths: tuple[str, ...] = ()  # channel counts ("16") or fractions of `width` ("0.5x")

    def choices(self) -> dict[str, tuple[str, ...]]:
        """Choice key -> candidates, in declaration order (the width last)."""
        out = {f"{self.name}.conv1": self.conv1}
        for i, candidates in enumerate(self.body):
            out[f"{self.name}.conv{i + 2}"] = candidates
        if self.skip:
            out[f"{self.name}.skip"] = self.skip
        if self.widths:
            out[f"{self.name}.width"] = self.widths
        return out

    def depth(self, arch: Mapping[str, str]) -> int:
        """How many body layers `arch` computes in this stage (all of them without a skip choice)."""
        return skip_depth(arch[f"{self.name}.skip"]) if self.skip else len(self.body)

    def candidate_channels(self, channels: Mapping[str, int]) -> dict[str, int]:
        """Width candidate -> its channels (a ConfigError if one does not fit the resolved width); {} without widths."""
        return {name: width_channels(self, name, channels) for name in self.widths}

    def max_channels(self, channels: Mapping[str, int]) -> int:
        """The channels the stage's ops are built with: its largest width candidate, else its width."""
        return max(self.candidate_channels(channels).values(), default=resolve_width(self.width, channels))

    def channels_of(self, arch: Mapping[str, str], channels: Mapping[str, int]) -> int:
        """The channels `arch` runs the stage at."""
        return width_channels(self, arch[f"{self.name}.width"], channels) if self.widths else resolve_width(
            self.width, channels)


def width_fraction(name: str) -> Fraction | None:
    """The fraction of a width candidate such as "0.5x", or None for a channel count such as "16"."""
    match = _FRACTION.match(name)
    return Fraction(match.group(1)) if match else None


def width_rank(name: str) -> Fraction:
    """How a width candidate ranks by size among its stage's (all counts or all fractions)."""
    fraction = width_fraction(name)
    return Fraction(int(name)) if fraction is None else fraction


def width_channels(stage: StageSpec, name: str, channels: Mapping[str, int]) -> int:
    """The channels of width candidate `name` of `stage`: a count, or a fraction of the resolved width that gives a
    whole number; a ConfigError if it exceeds the width."""
    full = resolve_width(stage.width, channels)
    fraction = width_fraction(name)
    value = Fraction(int(name)) if fraction is None else fraction * full
    if value.denominator != 1 or not 0 < value <= full:
        raise ConfigError(f"space: field '{stage.name}.widths': expected whole channel counts of at most the stage's "
                          f"width {full} ({stage.width}), got {name!r} ({float(value):g} channels)")
    return int(value)


@dataclass(frozen=True)
class ArchSpace:
    """A declared architecture space: stem op and width, the stages, the head."""

    stem_op: str
    stem_width: str | int
    stages: tuple[StageSpec, ...]
    head: HeadSpec = HeadSpec()

    @classmethod
    def seed(cls) -> ArchSpace:
        """The seed's SPOS space (Efficient-CIFAR-Series): 3 stages, 15 choices."""
        return cls.from_dict(SEED_SPACE, "the seed space")

    @classmethod
    def load(cls, spec: str | Path | None) -> ArchSpace:
        """A built-in space by name (BUILTIN_SPACES: 'seed', the default, or 'nas-bench-macro'), else a YAML/JSON file."""
        if spec is None:
            return cls.seed()
        if str(spec) in BUILTIN_SPACES:
            return cls.from_dict(BUILTIN_SPACES[str(spec)], f"the {spec} space")
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
            raise fail("(top level)", "a mapping with 'stem', 'stages' and optionally 'head'", spec)
        unknown = set(spec) - {"stem", "stages", "head"}
        if unknown:
            raise fail(sorted(unknown)[0], "only 'stem', 'stages' and 'head'", spec[sorted(unknown)[0]])
        stem = spec.get("stem", {"op": "conv3", "width": "prep"})
        if not isinstance(stem, Mapping) or set(stem) - {"op", "width"}:
            raise fail("stem", "a mapping with 'op' and 'width'", stem)
        stem_op = stem.get("op", "conv3")
        stem_spec = op_spec(stem_op) if isinstance(stem_op, str) else None
        if stem_spec is None or stem_spec.family != "conv" or stem_spec.downsamples:
            raise fail("stem.op", "a same-size conv op such as conv3 or conv5", stem_op)
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
        return cls(stem_op, stem_width, tuple(stages), _head(spec.get("head", {}), fail))

    def to_dict(self) -> dict[str, Any]:
        """The declaration, loadable again with `from_dict` (the head only where it is not the seed's)."""
        stages = []
        for s in self.stages:
            entry: dict[str, Any] = {"name": s.name, "width": s.width, "conv1": list(s.conv1)}
            for i, candidates in enumerate(s.body):
                entry[f"conv{i + 2}"] = list(candidates)
            if s.skip:
                entry["skip"] = list(s.skip)
            if s.widths:
                entry["widths"] = [c if width_fraction(c) else int(c) for c in s.widths]
            stages.append(entry)
        out = {"stem": {"op": self.stem_op, "width": self.stem_width}, "stages": stages}
        return out | ({"head": self.head.to_dict()} if self.head != HeadSpec() else {})

    def choices(self) -> dict[str, list[str]]:
        """Every choice key -> its candidates, in order (the NAS search space)."""
        return {k: list(v) for s in self.stages for k, v in s.choices().items()}

    def most_candidates(self) -> int:
        """The most candidates of any key: K, the paths per step of strict fairness and of the ladder's rungs."""
        return max(len(candidates) for candidates in self.choices().values())

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
            keys.append(f"{s.name}.conv1")
            keys += [f"{s.name}.conv{i + 2}" for i in range(s.depth(arch))]
            keys += [f"{s.name}.skip"] if s.skip else []
            keys += [f"{s.name}.width"] if s.widths else []
        return keys

    def has_widths(self) -> bool:
        """Whether some stage's width is a choice."""
        return any(s.widths for s in self.stages)

    def restrict(self, choices: Mapping[str, Sequence[str]]) -> ArchSpace:
        """The same space with each key limited to the given candidates (for shrinking)."""
        stages = []
        for s in self.stages:
            keep = {k: tuple(c for c in v if c in choices[k]) for k, v in s.choices().items()}
            if not all(keep.values()):
                empty = next(k for k, v in keep.items() if not v)
                raise ConfigError(f"restricting the space: key '{empty}' would have no candidate left")
            body = tuple(keep[f"{s.name}.conv{i + 2}"] for i in range(len(s.body)))
            stages.append(StageSpec(s.name, s.width, keep[f"{s.name}.conv1"], body, keep.get(f"{s.name}.skip", ()),
                                    keep.get(f"{s.name}.width", ())))
        return ArchSpace(self.stem_op, self.stem_width, tuple(stages), self.head)

    def fix(self, arch: Mapping[str, str], channels: Mapping[str, int] | None = None) -> ArchSpace:
        """The one-architecture space of a standalone network: chosen ops only, unused body convs dropped, each
        chosen width as the stage's width (a fraction of a width named after a hyper-parameter stays a
        one-candidate choice unless `channels` resolves it)."""
        arch = self.check(arch)
        stages = []
        for s in self.stages:
            body = tuple((arch[f"{s.name}.conv{i + 2}"],) for i in range(s.depth(arch)))
            skip = (arch[f"{s.name}.skip"],) if s.skip else ()
            width, widths = s.width, ()
            if s.widths:
                chosen = arch[f"{s.name}.width"]
                if channels is not None or isinstance(s.width, int):
                    width = width_channels(s, chosen, channels or {})
                elif width_fraction(chosen) is None:
                    width = int(chosen)
                else:
                    widths = (chosen,)
            stages.append(StageSpec(s.name, width, (arch[f"{s.name}.conv1"],), body, skip, widths))
        return ArchSpace(self.stem_op, self.stem_width, tuple(stages), self.head)

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


def _names(value: Any, field: str, allowed: Callable[[str], bool], expected: str, fail: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise fail(field, "a non-empty list of candidates", value)
    for i, name in enumerate(value):
        if not (isinstance(name, str) and allowed(name)):
            raise fail(f"{field}[{i}]", expected, name)
    if len(set(value)) != len(value):
        raise fail(field, "candidates without repeats", value)
    return tuple(value)


def _candidates(value: Any, field: str, downsampling: bool, fail: Any) -> tuple[str, ...]:
    """Op names of a conv1 (downsampling ops) or body (same-size ops) choice."""
    def allowed(name: str) -> bool:
        op = op_spec(name)
        return op is not None and op.downsamples == downsampling

    kind = "a downsampling op (_pool or _stride2)" if downsampling else "a same-size op (no _pool or _stride2)"
    return _names(value, field, allowed, f"{kind}: {OP_GRAMMAR}", fail)


def _widths(value: Any, width: str | int, field: str, fail: Any) -> tuple[str, ...]:
    """Width candidates: distinct positive channel counts or fractions ("0.5x"), one kind, none over an int width."""
    expected = "a list of channel counts or of fractions of the stage's width such as 0.5x (one kind)"
    if not isinstance(value, list) or not value:
        raise fail(field, expected, value)
    names = []
    for i, candidate in enumerate(value):
        counted = isinstance(candidate, int) and not isinstance(candidate, bool) and candidate > 0
        fraction = width_fraction(candidate) if isinstance(candidate, str) else None
        if not counted and not (fraction is not None and 0 < fraction <= 1):
            raise fail(f"{field}[{i}]", "a positive channel count or a fraction in (0, 1] such as 0.5x", candidate)
        names.append(str(candidate))
    if len({width_fraction(n) is None for n in names}) > 1:
        raise fail(field, expected, value)
    if len({width_rank(n) for n in names}) != len(names):
        raise fail(field, "candidates without repeats", value)
    if isinstance(width, int):
        for i, name in enumerate(names):
            size = width_rank(name) * (width if width_fraction(name) is not None else 1)
            if size > width or size.denominator != 1:
                raise fail(f"{field}[{i}]", f"a whole channel count of at most the stage's width {width}", value[i])
    return tuple(names)


def _stage(stage: Any, where: str, fail: Any) -> StageSpec:
    if not isinstance(stage, Mapping):
        raise fail(where, "a mapping with name, width, widths, conv1, conv2…, skip", stage)
    name = stage.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail(f"{where}.name", "an identifier (letters, digits, underscore)", name)
    body_fields = [k for k in stage if re.fullmatch(r"conv\d+", k) and k != "conv1"]
    n_body = len(body_fields)
    expected_fields = {"name", "width", "widths", "conv1", "skip"} | {f"conv{i + 2}" for i in range(n_body)}
    for key in stage:
        if key not in expected_fields:
            raise fail(f"{where}.{key}", f"fields name, width, widths, conv1, conv2…conv{n_body + 1} (consecutive), "
                       f"skip", key)
    if "conv1" not in stage:
        raise fail(f"{where}.conv1", "a list of candidates", None)
    conv1 = _candidates(stage["conv1"], f"{where}.conv1", True, fail)
    body = tuple(_candidates(stage[f"conv{i + 2}"], f"{where}.conv{i + 2}", False, fail) for i in range(n_body))
    skip: tuple[str, ...] = ()
    if "skip" in stage:
        skip_names = (["zero"] + [f"conv{k}_input" for k in range(3, n_body + 3)]
                      + [f"conv{k}_output" for k in range(2, n_body + 2)])
        skip = _names(stage["skip"], f"{where}.skip", lambda name: name in skip_names, f"one of {skip_names}", fail)
    width = _width(stage.get("width"), f"{where}.width", fail)
    widths = _widths(stage["widths"], width, f"{where}.widths", fail) if "widths" in stage else ()
    return StageSpec(name, width, conv1, body, skip, widths)


def _head(head: Any, fail: Any) -> HeadSpec:
    fields = {"conv", "pool", "bias", "scale_logits"}
    if not isinstance(head, Mapping) or set(head) - fields:
        raise fail("head", f"a mapping with some of {sorted(fields)}", head)
    spec = HeadSpec(**head)
    if spec.conv is not None and (isinstance(spec.conv, bool) or not isinstance(spec.conv, int) or spec.conv <= 0):
        raise fail("head.conv", "a positive channel count or null (no conv)", spec.conv)
    if spec.pool not in ("max", "avg"):
        raise fail("head.pool", "max or avg", spec.pool)
    for name in ("bias", "scale_logits"):
        if not isinstance(getattr(spec, name), bool):
            raise fail(f"head.{name}", "true or false", getattr(spec, name))
    return spec


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


class WidthChoice(nn.Module):
    """A stage's width, picked by `chosen` among its candidates (no weights: the stage's sliced ops use it)."""

    def __init__(self, key: str, channels: Mapping[str, int]):
        super().__init__()
        self.key = key
        self.channels = dict(channels)  # candidate -> channels
        self.chosen: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.channels)

    @property
    def active(self) -> int:
        if self.chosen is None:
            raise RuntimeError(f"{self.key}: no width chosen; call set_arch first")
        return self.channels[self.chosen]


class SearchStage(nn.Module):
    """conv1 (downsampling), body layers, and (if the stage has one) the skip that adds a body output back to conv1's.

    `sliced`: the ops are elastic (see SlicedConv2d), as in a stage with several widths or after one.
    """

    def __init__(self, spec: StageSpec, c_in: int, c_out: int, widths: Mapping[str, int] | None = None,
                 sliced: bool = False):
        super().__init__()
        self.conv1 = LayerChoice(f"{spec.name}.conv1", {op: make_op(op, c_in, c_out, sliced) for op in spec.conv1})
        self.body = nn.ModuleDict({
            f"conv{i + 2}": LayerChoice(f"{spec.name}.conv{i + 2}",
                                        {op: make_op(op, c_out, c_out, sliced) for op in ops})
            for i, ops in enumerate(spec.body)
        })
        self.skip = InputChoice(f"{spec.name}.skip", spec.skip) if spec.skip else None
        self.depths = [skip_depth(name) for name in spec.skip]
        if widths:
            self.width = WidthChoice(f"{spec.name}.width", widths)

    def apply_width(self) -> None:
        """Point the stage's sliced convs at the chosen width (all channels without a width choice)."""
        active = self.width.active if hasattr(self, "width") else None
        for module in self.modules():
            if isinstance(module, SlicedConv2d):
                module.active_out = active

    @property
    def depth(self) -> int:
        """Body layers the chosen path computes."""
        return len(self.body) if self.skip is None else self.depths[self.skip.chosen_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.skip is None:
            for layer in self.body.values():
                x = layer(x)
            return x
        taps = [x]  # taps[d]: the output after d body convs; only those needed are computed
        for conv in list(self.body.values())[:self.depth]:
            taps.append(conv(taps[-1]))
        skip = self.skip([taps[d] if 0 < d < len(taps) else None for d in self.depths])
        return x if skip is None else x + skip


def make_head(head: HeadSpec, c_in: int, num_classes: int, logits_weight: float = 0.125,
              sliced: bool = False) -> nn.Sequential:
    """The declared head (see HeadSpec) on c_in channels; `sliced`: on the first channels it receives (after an
    elastic stage)."""
    layers: list[nn.Module] = []
    if head.conv is not None:
        conv = SlicedConv2d if sliced else nn.Conv2d
        layers += [conv(c_in, head.conv, 1, bias=False), nn.BatchNorm2d(head.conv), nn.ReLU(inplace=True)]
        c_in, sliced = head.conv, False
    linear = SlicedLinear if sliced else nn.Linear
    layers += [nn.AdaptiveMaxPool2d(1) if head.pool == "max" else nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               linear(c_in, num_classes, bias=head.bias)]
    return nn.Sequential(*layers, *([Scale(logits_weight)] if head.scale_logits else []))


def resolve_width(width: str | int, channels: Mapping[str, int]) -> int:
    """A stage width: a channel count, or the name of one in `channels` (the HPO widths)."""
    return channels[width] if isinstance(width, str) else width


class Supernet(nn.Module):
    """Stem, search stages and the declared head; `set_arch` picks the path the forward pass runs."""

    def __init__(self, space: ArchSpace, channels: Mapping[str, int], num_classes: int, logits_weight: float = 0.125,
                 canonical_paths: bool = False):
        super().__init__()
        self.space, self.canonical_paths = space, canonical_paths
        c_in = resolve_width(space.stem_width, channels)
        self.prep = make_op(space.stem_op, 3, c_in)
        stages, elastic = {}, False  # elastic: the previous stage's width varies
        for spec in space.stages:
            widths = spec.candidate_channels(channels)
            c_out = spec.max_channels(channels)
            stages[spec.name] = SearchStage(spec, c_in, c_out, widths, sliced=elastic or len(widths) > 1)
            c_in, elastic = c_out, len(widths) > 1
        self.stages = nn.ModuleDict(stages)
        self.head = make_head(space.head, c_in, num_classes, logits_weight, sliced=elastic)
        if space.size() == 1:  # a standalone network: its only architecture is always active
            self.set_arch({k: v[0] for k, v in space.choices().items()})

    def choice_modules(self) -> dict[str, LayerChoice | InputChoice | WidthChoice]:
        """Choice key -> its module."""
        return {m.key: m for m in self.modules() if isinstance(m, (LayerChoice, InputChoice, WidthChoice))}

    def path_of(self, arch: Mapping[str, str]) -> Arch:
        """The path that runs `arch`: the architecture itself, or with `canonical_paths` its network's canonical path."""
        arch = self.space.check(arch)
        return canonical_path(self.space, arch) if self.canonical_paths else arch

    def set_arch(self, arch: Mapping[str, str]) -> None:
        """Select one candidate per key (see `path_of`); later forwards run only that path."""
        modules = self.choice_modules()
        for key, candidate in self.path_of(arch).items():
            modules[key].chosen = candidate
        for stage in self.stages.values():
            stage.apply_width()

    def active_network(self) -> Supernet:
        """The network the selected path runs in: this one (see FewShotSupernet)."""
        return self

    def inactive_parameters(self) -> list[nn.Parameter]:
        """Parameters the current path does not use (unchosen candidates, body convs past the skip)."""
        unused = []
        for stage in self.stages.values():
            for index, choice in enumerate([stage.conv1, *stage.body.values()]):
                for name, op in choice.candidates.items():
                    if name != choice.chosen or index > stage.depth:
                        unused += list(op.parameters())
        return unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prep(x)
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)


class FewShotSupernet(nn.Module):
    """Sub-supernets split on one choice key (few-shot NAS, Zhao et al. 2021), each a copy of one supernet.

    Sub-supernet `c` only ever trains paths whose candidate at `key` is `c`, so those paths no
    longer share weights with the others; a path runs (and is judged) in its own sub-supernet.
    """

    def __init__(self, oneshot: Supernet, key: str, candidates: Sequence[str]):
        super().__init__()
        self.space, self.key = oneshot.space, key
        self.splits = nn.ModuleDict({c: copy.deepcopy(oneshot) for c in candidates})
        self.active = candidates[0]

    def split(self, candidate: str) -> Supernet:
        return self.splits[candidate]  # type: ignore[return-value]

    def path_of(self, arch: Mapping[str, str]) -> Arch:
        """The path that runs `arch` (see Supernet.path_of)."""
        return self.split(self.active).path_of(arch)

    def set_arch(self, arch: Mapping[str, str]) -> None:
        """Select the path in the sub-supernet of its candidate at `key`."""
        self.active = self.path_of(arch)[self.key]
        self.split(self.active).set_arch(arch)

    def active_network(self) -> Supernet:
        """The sub-supernet the selected path runs in."""
        return self.split(self.active)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.splits[self.active](x)


def build_standalone(space: ArchSpace, arch: Mapping[str, str], channels: Mapping[str, int], num_classes: int,
                     logits_weight: float = 0.125) -> Supernet:
    """A network with only the chosen ops of `arch` (its parameter names match the supernet's)."""
    return Supernet(space.fix(arch, channels), channels, num_classes, logits_weight)


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
    """Every candidate of every choice with its input shape, so cost tables measure each op where it runs; with
    width choices, at every pair of input and output channels it can run at (width keys have no site)."""
    out = []
    c_ins, size = [resolve_width(space.stem_width, channels)], IMAGE_SIZE
    for s in space.stages:
        c_outs = sorted(set(s.candidate_channels(channels).values())) or [resolve_width(s.width, channels)]
        out += [Site(f"{s.name}.conv1", op, c_in, c_out, size) for op in s.conv1 for c_in in c_ins for c_out in c_outs]
        size //= 2
        out += [Site(key, name, c_out, c_out, size) for key, names in list(s.choices().items())[1:]
                if not key.endswith(".width") for name in names for c_out in c_outs]
        c_ins = c_outs
    return out


def op_channels(space: ArchSpace, widths: Sequence[int], c_stem: int) -> Iterator[tuple[str, int, int]]:
    """(key, channels in, channels out) of every op and skip key when the stages run at `widths`."""
    c_in = c_stem
    for s, c_out in zip(space.stages, widths):
        for key in s.choices():
            if not key.endswith(".width"):
                yield key, c_in if key.endswith(".conv1") else c_out, c_out
        c_in = c_out


def arch_key(space: ArchSpace, arch: Mapping[str, str]) -> str:
    """The canonical key of an architecture: its active choices only (inactive body convs do not count)."""
    return ",".join(f"{key}={arch[key]}" for key in space.active_keys(arch))


def body_layers(stage: StageSpec, arch: Mapping[str, str]) -> list[str]:
    """The body ops `arch` computes in a stage; in a stage without a skip choice a same-size `identity` is a no-op,
    so only the other ops count, in order (where the identities sit does not change the network)."""
    layers = [arch[f"{stage.name}.conv{i + 2}"] for i in range(stage.depth(arch))]
    return layers if stage.skip else [op for op in layers if op != "identity"]


def network_key(space: ArchSpace, arch: Mapping[str, str]) -> str:
    """The key of the standalone network (see `body_layers`): NAS-Bench-Macro trained each such network once.

    A supernet holds separate weights per position, so the paths of one network can score differently
    unless it runs them all as one (`canonical_path`).
    """
    parts = []
    for s in space.stages:
        parts.append(f"{s.name}={'+'.join([arch[f'{s.name}.conv1'], *body_layers(s, arch)])}"
                     + (f",{s.name}.skip={arch[f'{s.name}.skip']}" if s.skip else ""))
    return ",".join(parts)


def canonical_path(space: ArchSpace, arch: Mapping[str, str]) -> Arch:
    """The one path of `arch`'s network with each sequential stage's layers first and its identities last.

    As OFA's elastic depth keeps a stage's first layers, a layer position then always sees the
    same input (the previous real layer). Stages whose keys could not hold the moved ops keep theirs.
    """
    path = dict(arch)
    for s in space.stages:
        if s.skip:
            continue
        layers = body_layers(s, arch)
        moved = layers + ["identity"] * (len(s.body) - len(layers))
        if all(op in candidates for op, candidates in zip(moved, s.body)):
            path.update({f"{s.name}.conv{i + 2}": op for i, op in enumerate(moved)})
    return path


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


def pick_stratified(items: Sequence[Any], count: int, rng: random.Random) -> list[Any]:
    """`count` of `items` (sorted by a cost), one drawn from each of `count` strata of (nearly) equal size; all if fewer.

    A uniform sample of a space clusters around its median size; strata spread the sample over
    the whole range, which is where a ranking must hold.
    """
    if count <= 0 or count >= len(items):
        return list(items)
    bounds = [round(i * len(items) / count) for i in range(count + 1)]
    return [items[rng.randrange(lo, hi)] for lo, hi in zip(bounds, bounds[1:])]


def stratified_archs(space: ArchSpace, costs: CostTable, count: int, rng: random.Random) -> list[Arch]:
    """`count` architectures of distinct networks spread over FLOPs (see `pick_stratified`), smallest first.

    Drawn from a pool of max(2,000, 50 x count) distinct uniform random networks (the whole space when smaller).
    """
    pool: dict[str, Arch] = {}
    for _ in range(max(20_000, 500 * count)):
        if len(pool) == max(2_000, 50 * count):
            break
        arch = {key: rng.choice(candidates) for key, candidates in space.choices().items()}
        pool.setdefault(network_key(space, arch), arch)
    ordered = sorted(pool.values(), key=lambda arch: (costs.flops_of(arch), network_key(space, arch)))
    return pick_stratified(ordered, count, rng)


def extreme_arch(costs: Mapping[str, Mapping[str, float]], space: ArchSpace, largest: bool) -> Arch:
    """The subnet of `space` with the largest or smallest additive cost (per-key costs over active keys).

    Deepest (shallowest) skip and costliest (cheapest) op per key; the cost is additive over
    active keys and a deeper skip only adds layers, so the per-key pick is the extreme.
    """
    pick = max if largest else min
    return {key: pick(candidates, key=candidate_cost(costs, key)) for key, candidates in space.choices().items()}


def candidate_cost(costs: Mapping[str, Mapping[str, float]], key: str) -> Callable[[str], Any]:
    """How a candidate of `key` is ranked by size: a skip by its depth, a width by its channels, an op by its cost."""
    if key.endswith(".skip"):
        return skip_depth
    return width_rank if key.endswith(".width") else costs[key].__getitem__


def ladder_arch(costs: Mapping[str, Mapping[str, float]], space: ArchSpace, rung: int, rungs: int) -> Arch:
    """Rung `rung` of `rungs` all-same paths from the cheapest to the costliest: each key takes its candidate
    of rank `rung * n // rungs` by size (n candidates), so every candidate is on a rung and a key with fewer
    candidates than `rungs` repeats them evenly (K // n or K // n + 1 times)."""
    arch = {}
    for key, candidates in space.choices().items():
        ranked = sorted(candidates, key=candidate_cost(costs, key))
        arch[key] = ranked[rung * len(ranked) // rungs]
    return arch


@dataclass(frozen=True)
class CostTable:
    """FLOPs and parameters of the fixed parts and of each candidate at each width it can run at, computed once per space.

    A subnet's cost is the stem, the head at the last stage's width, and the candidates of its
    active keys at their stages' widths; this equals a direct count of the standalone network (a
    test checks it), so limits can be applied to sampled paths without building them.
    """

    flops: dict[str, dict[str, int]]  # key -> candidate -> FLOPs at the widest (how candidates rank)
    params: dict[str, dict[str, int]]
    space: ArchSpace
    channels: dict[str, int]
    stem: tuple[int, int]  # (FLOPs, parameters)
    heads: dict[int, tuple[int, int]]  # the last stage's channels -> the head's (FLOPs, parameters)
    ops: dict[tuple[str, str, int, int], tuple[int, int]]  # (key, candidate, c_in, c_out) -> (FLOPs, parameters)

    @classmethod
    def build(cls, space: ArchSpace, channels: Mapping[str, int], num_classes: int) -> CostTable:
        """Count every op once on the meta device (nothing is computed); skips cost nothing counted."""
        ops: dict[tuple[str, str, int, int], tuple[int, int]] = {}
        for site in sites(space, channels):
            if site.key.endswith(".skip"):
                ops[site.key, site.name, site.c_in, site.c_out] = (0, 0)
                continue
            module = make_op(site.name, site.c_in, site.c_out)
            ops[site.key, site.name, site.c_in, site.c_out] = (
                count_flops(module, (1, site.c_in, site.size, site.size)), count_parameters(module))
        c_stem = resolve_width(space.stem_width, channels)
        stem = make_op(space.stem_op, 3, c_stem)
        size = IMAGE_SIZE >> len(space.stages)
        heads = {}
        for c_last in {site.c_out for site in sites(space, channels) if site.key.startswith(f"{space.stages[-1].name}.")}:
            head = make_head(space.head, c_last, num_classes)
            heads[c_last] = (count_flops(head, (1, c_last, size, size)), count_parameters(head))
        widest = [s.max_channels(channels) for s in space.stages]
        flops: dict[str, dict[str, int]] = {key: {} for key in space.choices()}
        params: dict[str, dict[str, int]] = {key: {} for key in space.choices()}
        for key, c_in, c_out in op_channels(space, widest, c_stem):
            for name in space.choices()[key]:
                flops[key][name], params[key][name] = ops[key, name, c_in, c_out]
        return cls(flops, params, space, dict(channels), (count_flops(stem, (1, 3, IMAGE_SIZE, IMAGE_SIZE)),
                                                          count_parameters(stem)), heads, ops)

    def total(self, arch: Mapping[str, str], part: int) -> int:
        """FLOPs (part 0) or parameters (part 1) of the subnet: stem, head and active keys at the arch's widths."""
        widths = [s.channels_of(arch, self.channels) for s in self.space.stages]
        active = set(self.space.active_keys(arch))
        c_stem = resolve_width(self.space.stem_width, self.channels)
        return self.stem[part] + self.heads[widths[-1]][part] + sum(
            self.ops[key, arch[key], c_in, c_out][part]
            for key, c_in, c_out in op_channels(self.space, widths, c_stem) if key in active)

    def flops_of(self, arch: Mapping[str, str]) -> int:
        """Forward FLOPs of one image through the subnet."""
        return self.total(arch, 0)

    def params_of(self, arch: Mapping[str, str]) -> int:
        """Trainable parameters of the standalone subnet."""
        return self.total(arch, 1)

    def extreme(self, largest: bool, space: ArchSpace | None = None) -> Arch:
        """The subnet of `space` (default: the table's) with the most or fewest FLOPs.

        Given the widths, costs add up per key, so the per-key pick is the extreme; over widths,
        each combination of a stage's widths is tried (few: the candidates of each stage multiplied).
        """
        space = space or self.space
        if not space.has_widths():
            return extreme_arch(self.flops, space, largest)
        return extreme_over_widths(space, self.channels, lambda *site: self.ops[site][0], self.flops_of, largest)


def extreme_over_widths(space: ArchSpace, channels: Mapping[str, int], site_cost: Callable[[str, str, int, int], float],
                        total: Callable[[Arch], float], largest: bool) -> Arch:
    """The subnet of a space with width choices of the largest (smallest) `total` cost: for each combination of the
    stages' widths the per-key extreme by `site_cost(key, candidate, c_in, c_out)` (exact: given the widths, costs
    add up per key), then the extreme of those by `total` (which adds the parts that depend on the widths alone)."""
    keys = {f"{s.name}.width": s.widths for s in space.stages if s.widths}
    c_stem = resolve_width(space.stem_width, channels)
    archs = []
    for combination in itertools.product(*keys.values()):
        fixed = dict(zip(keys, combination))
        widths = [s.channels_of(fixed, channels) for s in space.stages]
        costs = {key: {name: site_cost(key, name, c_in, c_out) for name in space.choices()[key]}
                 for key, c_in, c_out in op_channels(space, widths, c_stem)}
        archs.append(extreme_arch(costs, space.restrict({**space.choices(), **{k: [v] for k, v in fixed.items()}}),
                                  largest))
    return (max if largest else min)(archs, key=total)


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
