"""Which paths each supernet training step trains: the path samplers, by name in a registry.

`sampling: NAME` in a supernet config picks the sampler registered under NAME with
`@path_sampler_rule(NAME)`; the samplers' settings are the config's `sampler` group (`SamplerFields`:
the FLOPs range of every rule, and each rule's own). The config is checked against the registry and
the trainer builds its sampler with `path_sampler(name, settings, seed, costs)`. A sampler draws with
a generator of its own (its state is checkpointed), and under FLOPs limits only paths within them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from effcifar.config import field_error, setting
from effcifar.errors import ConfigError
from effcifar.nas.costs import CostTable
from effcifar.nas.space import Arch, ArchSpace

MAX_SAMPLING_TRIES = 10_000
EXTREME_DRAWS = 1_000  # feasible draws among which a sampler takes the largest/smallest path under FLOPs limits
FAIR_DRAWS = 100  # fair groups drawn per step under FLOPs limits before the step takes uniform paths within them


@dataclass
class SamplerFields:
    """The path samplers' settings (`SupernetConfig.sampler`): the FLOPs range every rule keeps to, and the
    settings of one rule only (named after it, checked by its `check`)."""

    flops_min: float | None = setting(None, "sample only paths with at least this many forward FLOPs per image")
    flops_max: float | None = setting(None, "sample only paths with at most this many forward FLOPs per image")
    sandwich_paths: int = setting(4, "paths per step with sampling sandwich (largest, smallest, the rest random)")

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for a FLOPs limit that is not positive or a range that is empty."""
        for name in ("flops_min", "flops_max"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise field_error(name, "a positive number of FLOPs or none", getattr(self, name))
        if self.flops_min is not None and self.flops_max is not None and self.flops_min > self.flops_max:
            raise field_error("flops_max", f"a number >= flops_min ({self.flops_min:g})", self.flops_max)


Rule = TypeVar("Rule", bound="type[PathSampler]")
PATH_SAMPLERS: dict[str, type[PathSampler]] = {}  # `sampling` name -> sampler class, in registration order


def path_sampler_rule(name: str) -> Callable[[Rule], Rule]:
    """Class decorator: register a PathSampler subclass as the sampling rule `name`."""
    def register(rule: Rule) -> Rule:
        PATH_SAMPLERS[name] = rule
        return rule
    return register


def check_sampling(sampling: str, settings: SamplerFields) -> None:
    """ConfigError (with `field`) unless `sampling` names a registered rule and the settings are valid for it."""
    if sampling not in PATH_SAMPLERS:
        raise field_error("sampling", f"one of {', '.join(PATH_SAMPLERS)}", sampling)
    settings.validate()
    PATH_SAMPLERS[sampling].check(settings)


def path_sampler(sampling: str, settings: SamplerFields, seed: int, costs: CostTable) -> PathSampler:
    """The sampler of the rule `sampling`, seeded with `seed`."""
    return PATH_SAMPLERS[sampling].from_settings(settings, seed, costs)


@path_sampler_rule("uniform")
class PathSampler:
    """The paths of each training step. Uniform (SPOS): one path, resampled until its FLOPs are within limits.

    Subclasses are the other rules: they override `step_paths` (and `check`/`from_settings` when
    they read settings of their own) and register with `@path_sampler_rule`.
    """

    def __init__(self, costs: CostTable, seed: int, flops_min: float | None = None, flops_max: float | None = None):
        self.costs, self.flops_min, self.flops_max, self.seed = costs, flops_min, flops_max, seed
        self.rng = random.Random(seed)
        self.extremes: dict[tuple[bool, str], Arch] = {}  # (largest, space) -> path: computed once per space

    @classmethod
    def check(cls, settings: SamplerFields) -> None:
        """ConfigError (with `field`) for a bad setting of this rule's own."""

    @classmethod
    def from_settings(cls, settings: SamplerFields, seed: int, costs: CostTable) -> PathSampler:
        """This rule's sampler for a supernet config's `sampler` settings."""
        return cls(costs, seed, settings.flops_min, settings.flops_max)

    def step_paths(self, space: ArchSpace) -> list[Arch]:
        """The paths one training step trains (their gradients are averaged before the update)."""
        return [self.sample(space)]

    def extreme(self, largest: bool, space: ArchSpace) -> Arch:
        """The path with the most (fewest) FLOPs within the limits: the table's extreme when it is within them,
        else the extreme of EXTREME_DRAWS feasible draws of a generator of its own (the training draws are untouched,
        so a resumed run picks the same one)."""
        key = (largest, json.dumps(space.choices()))
        if key not in self.extremes:
            arch = self.costs.extreme(largest, space)
            if not self.within_limits(arch):
                own = PathSampler(self.costs, self.seed, self.flops_min, self.flops_max)
                arch = (max if largest else min)([own.sample(space) for _ in range(EXTREME_DRAWS)],
                                                 key=self.costs.flops_of)
            self.extremes[key] = arch
        return self.extremes[key]

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (weights_only-loadable), for checkpoints."""
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue drawing where `state_dict()` was taken."""
        self.rng.setstate(_as_tuple(state["rng"]))

    def within_limits(self, arch: Arch) -> bool:
        if self.flops_min is None and self.flops_max is None:
            return True  # no FLOPs to count: every training step asks, with or without limits
        flops = self.costs.flops_of(arch)
        return ((self.flops_min is None or flops >= self.flops_min)
                and (self.flops_max is None or flops <= self.flops_max))

    def sample(self, space: ArchSpace) -> Arch:
        """One path with every choice drawn uniformly among the space's candidates."""
        choices = space.choices()
        for _ in range(MAX_SAMPLING_TRIES):
            arch = {key: self.rng.choice(candidates) for key, candidates in choices.items()}
            if self.within_limits(arch):
                return arch
        raise ConfigError(
            f"no path within flops_min={self.flops_min} / flops_max={self.flops_max} after "
            f"{MAX_SAMPLING_TRIES} draws (smallest {self.costs.flops_of(self.costs.extreme(False, space)):.4g}, "
            f"largest {self.costs.flops_of(self.costs.extreme(True, space)):.4g} FLOPs)"
        )


@path_sampler_rule("fair")
class FairSampler(PathSampler):
    """FairNAS's strict fairness: each step trains K paths that together use every candidate of every key evenly.

    K is the largest number of candidates of a key. A key's column of K picks is a run of random
    permutations of its candidates, so within a step each candidate is used K // n or K // n + 1
    times (n candidates): every candidate, every step, and no weight trained twice as often. Under
    FLOPs limits a group with a path outside them is redrawn (FAIR_DRAWS times); if none fits, the
    step trains K uniform paths within the limits (fair where the limits allow it).
    """

    def step_paths(self, space: ArchSpace) -> list[Arch]:
        choices = space.choices()
        k = space.most_candidates()
        for _ in range(FAIR_DRAWS):
            columns = {}
            for key, candidates in choices.items():
                column: list[str] = []
                while len(column) < k:
                    column += self.rng.sample(candidates, len(candidates))
                columns[key] = column[:k]
            paths = [{key: column[j] for key, column in columns.items()} for j in range(k)]
            if all(self.within_limits(path) for path in paths):
                return paths
        return [self.sample(space) for _ in range(k)]


@path_sampler_rule("sandwich")
class SandwichSampler(PathSampler):
    """BigNAS's sandwich rule: the largest and the smallest path (by FLOPs, within the limits) and `paths - 2`
    uniform random ones (`paths`: the config's `sampler.sandwich_paths`)."""

    def __init__(self, costs: CostTable, seed: int, paths: int, flops_min: float | None = None,
                 flops_max: float | None = None):
        super().__init__(costs, seed, flops_min, flops_max)
        self.paths = paths

    @classmethod
    def check(cls, settings: SamplerFields) -> None:
        if settings.sandwich_paths < 2:
            raise field_error("sandwich_paths", "an integer >= 2 (the largest and the smallest path)",
                              settings.sandwich_paths)

    @classmethod
    def from_settings(cls, settings: SamplerFields, seed: int, costs: CostTable) -> PathSampler:
        return cls(costs, seed, settings.sandwich_paths, settings.flops_min, settings.flops_max)

    def step_paths(self, space: ArchSpace) -> list[Arch]:
        return [self.extreme(True, space), self.extreme(False, space)] + [
            self.sample(space) for _ in range(self.paths - 2)]


def _as_tuple(value: Any) -> Any:
    """random.Random state from its checkpointed form (lists back to tuples)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
