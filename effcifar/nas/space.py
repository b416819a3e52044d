"""Architecture spaces declared in data: stages of choices, their keys and candidates, architecture files.

A space is a stem, stages and a head. Each stage has a downsampling `conv1` choice and body
layers `conv2`…`convN` (each a choice). With a `skip` choice, the stage adds one body output
back to conv1's output: `zero` (no body at all), `conv3_input` (after conv2), `conv4_input`
(after conv3), … or `convN_output` (after the whole body) — the original series' SPOS space. Without
one, the body layers run in sequence (a MobileNet-style macro space, such as NAS-Bench-Macro's).
Every choice has a stable key such as `stage1.conv1` or `stage2.skip`; an architecture is a
dict key -> candidate. Ops are named by a small grammar (see `op_spec`): `conv3`, `conv5_pool`,
`mb6_k5`, `mb3_k3_stride2`, `identity`, `identity_stride2`, ...

Width choices (OFA/BigNAS elastic channels): a stage may declare `widths` beside its `width`,
adding the key `stageN.width`. Its candidates are either channel counts (`[16, 24, 32]`, the
candidates "16", "24", "32") or fractions of the stage's width (`["0.5x", "0.75x", "1x"]`), one kind
per stage; fractions are what a width named after a hyper-parameter (`layer1`) needs. Each must
come to a whole number of channels no larger than the stage's width (checked where the width is
resolved); `effcifar.nas.ops` shows how the supernet's ops share one set of weights across widths.

The nn.Modules are in `effcifar.nas.ops` (candidate ops, head) and `effcifar.nas.network` (choice
modules, the supernet, standalone networks); FLOPs and parameters in `effcifar.nas.costs`.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from effcifar.config import read_config_file, read_json
from effcifar.errors import ConfigError
from effcifar.models import NETWORK_STAGES

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


@dataclass(frozen=True)
class HeadSpec:
    """The classifier after the last stage: optional 1x1 conv + BN + ReLU, global pool, linear, logits scale.

    The default is the original series' (global max-pool, bias-free linear, the config's `logits_weight`);
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
        """The original series' SPOS space (Efficient-CIFAR-Series): 3 stages, 15 choices."""
        return cls.from_dict(SEED_SPACE, "the seed space")

    @classmethod
    def load(cls, spec: str | Path | None) -> ArchSpace:
        """A built-in space by name (BUILTIN_SPACES: 'seed', the default, 'seed-widths' or 'nas-bench-macro'), else a
        YAML/JSON file."""
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
                raise fail(f"stages[{i}].name", "a stage name not used before (choice keys must be unique)",
                           parsed.name)
            names.add(parsed.name)
            stages.append(parsed)
        return cls(stem_op, stem_width, tuple(stages), _head(spec.get("head", {}), fail))

    def to_dict(self) -> dict[str, Any]:
        """The declaration, loadable again with `from_dict` (the head only where it is not the original series')."""
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
        """The most candidates of any key: K, the paths per step of strict fairness."""
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
    if isinstance(value, bool) or not (value in NETWORK_STAGES or (isinstance(value, int) and value > 0)):
        raise fail(field, f"a positive channel count or one of {list(NETWORK_STAGES)} (taken from the "
                          "hyper-parameters)", value)
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


def resolve_width(width: str | int, channels: Mapping[str, int]) -> int:
    """A stage width: a channel count, or the name of one in `channels` (the HPO widths)."""
    return channels[width] if isinstance(width, str) else width


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

    A supernet holds separate weights per position, so the paths of one network can score differently.
    """
    parts = []
    for s in space.stages:
        parts.append(f"{s.name}={'+'.join([arch[f'{s.name}.conv1'], *body_layers(s, arch)])}"
                     + (f",{s.name}.skip={arch[f'{s.name}.skip']}" if s.skip else ""))
    return ",".join(parts)


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
    if "arch" in data and data["arch"] is None:  # a selection's answer that lies outside the space
        widths = data.get("widths")
        shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in widths.items()) if isinstance(widths, dict) else ""
        raise ConfigError(f"{path}: no architecture: the answer {data.get('name', '')!r} is the base network"
                          f"{' at other widths' if shown else ''}, not a network of the space; train the base "
                          f"config{' with ' + shown if shown else ''} instead of --arch")
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
