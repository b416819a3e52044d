"""FLOPs and parameters of a space's subnets, counted once per op (`CostTable`), and what follows from them:
the largest and smallest subnet, and samples of architectures spread over FLOPs.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from effcifar.models import count_flops, count_parameters
from effcifar.nas.ops import make_head, make_op
from effcifar.nas.space import Arch, ArchSpace, network_key, resolve_width, skip_depth, width_rank

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


def pick_stratified(items: Sequence[Any], count: int, rng: random.Random) -> list[Any]:
    """`count` of `items` (sorted by a cost), one drawn from each of `count` strata of (nearly) equal size; all if
    fewer.

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


@dataclass(frozen=True)
class CostTable:
    """FLOPs and parameters of the fixed parts and of each candidate at each width it can run at, once per space.

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
        last_stage = f"{space.stages[-1].name}."
        for c_last in {site.c_out for site in sites(space, channels) if site.key.startswith(last_stage)}:
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
