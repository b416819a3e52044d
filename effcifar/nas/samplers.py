"""Architecture samplers for the search study: SPOS evolution, random search and NSGA-II.

An architecture space is `{choice key: [candidate names]}` and an architecture `{key: name}`.
Each sampler draws a whole architecture at once through Optuna's relative sampling: the
objective calls `suggest_arch(trial, space)` (one categorical parameter per key) and gets it.

Every sampler derives its state from the study alone (trial params, values and system
attributes), so a resumed study, or several workers sharing one storage, continue where the
study stands; only the random generator is per process. Every proposal passes two checks:
`is_feasible(arch)` (the search's FLOPs, parameter and latency limits), so a candidate over a
limit is never returned and never evaluated, and novelty against the architectures of all other
trials that did not fail (duplicates are skipped while a new one can be found). Two
architectures are the same when `canonical(arch)` is equal (default: every choice; the search
passes its canonical key, so architectures that differ only in unused choices are duplicates). Call
`suggest_arch` under the study's budget lock so that parallel workers never draw the same one.

Each trial records, as system attributes: `nas:arch` (the architecture, written when it is
drawn, so workers see it before its params are complete), `nas:origin` (random, mutation,
crossover, or the wrapped sampler's name), `nas:parents` (trial numbers) and, for evolution,
`evolution:generation`, from which a report plots best and mean accuracy per generation.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from effcifar.config import field_error
from effcifar.errors import ConfigError

Space = dict[str, list[str]]
Arch = dict[str, str]
Feasible = Callable[[Arch], bool]
Canonical = Callable[[Arch], Hashable]

STRATEGIES = ("evolution", "random", "nsga2")
ARCH_ATTR = "nas:arch"
ORIGIN_ATTR = "nas:origin"
PARENTS_ATTR = "nas:parents"
GENERATION_ATTR = "evolution:generation"


@dataclass(frozen=True)
class Candidate:
    """A proposed architecture, how it was made and from which trials."""

    arch: Arch
    origin: str
    parents: list[int] = field(default_factory=list)


def check_space(space: Space) -> None:
    """Raise ConfigError unless every key has a non-empty list of distinct candidate names."""
    if not space:
        raise ConfigError("architecture space: expected at least one choice key, got none")
    for key, candidates in space.items():
        if not isinstance(candidates, list) or not candidates or len(set(candidates)) != len(candidates):
            raise ConfigError(f"architecture space: key '{key}': expected a non-empty list of distinct "
                              f"candidate names, got {candidates!r}")


def suggest_arch(trial: optuna.trial.BaseTrial, space: Space) -> Arch:
    """The trial's architecture: one categorical parameter per choice key (drawn whole by our samplers)."""
    return {key: trial.suggest_categorical(key, candidates) for key, candidates in space.items()}


def trial_arch(trial: FrozenTrial, space: Space) -> Arch | None:
    """The architecture a trial drew or was given, or None if it has none (yet)."""
    source = trial.system_attrs.get(ARCH_ATTR) or trial.params
    return {key: source[key] for key in space} if all(key in source for key in space) else None


class ArchSampler(optuna.samplers.BaseSampler):
    """Draws whole feasible architectures, new ones first; subclasses say how candidates are proposed.

    The proposals of `proposals()` are tried first (at most `max_tries`), then uniform random
    ones (at most `max_tries` more); the first feasible architecture that no other trial has
    wins. If all feasible ones seen were duplicates, one of them is returned; if none was
    feasible, a ConfigError says the limits leave (almost) nothing to search.
    """

    def __init__(self, space: Space, *, seed: int | None = None, is_feasible: Feasible | None = None,
                 max_tries: int = 1000, canonical: Canonical | None = None):
        check_space(space)
        if max_tries < 1:
            raise field_error("max_tries", "a positive integer", max_tries)
        self.space = {key: list(candidates) for key, candidates in space.items()}
        self.is_feasible = is_feasible or (lambda arch: True)
        self.canonical = canonical or (lambda arch: tuple(arch.values()))
        self.max_tries = max_tries
        self.rng = random.Random(seed)
        self.independent = optuna.samplers.RandomSampler(seed=seed)  # parameters outside the space

    def reseed_rng(self) -> None:
        """Fresh entropy for copies made by study.optimize(n_jobs > 1), so threads do not repeat each other."""
        self.rng.seed()
        self.independent.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """The whole architecture space, so sample_relative draws every choice together."""
        return {key: CategoricalDistribution(candidates) for key, candidates in self.space.items()}

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """Choose this trial's architecture and record where it came from."""
        taken = {self.canonical(arch) for t in study.get_trials(deepcopy=False)
                 if t.number != trial.number and t.state != TrialState.FAIL
                 and (arch := trial_arch(t, self.space)) is not None}
        chosen = self.choose(self.proposals(study, trial), taken)
        for key, value in ((ARCH_ATTR, chosen.arch), (ORIGIN_ATTR, chosen.origin), (PARENTS_ATTR, chosen.parents)):
            study._storage.set_trial_system_attr(trial._trial_id, key, value)  # samplers cannot set user attrs
        return dict(chosen.arch)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        """Parameters outside the architecture space are drawn uniformly."""
        return self.independent.sample_independent(study, trial, param_name, param_distribution)

    def proposals(self, study: Study, trial: FrozenTrial) -> Iterable[Candidate]:
        """Candidates to try before random ones; none here (pure random search)."""
        return ()

    def random_arch(self) -> Arch:
        """A uniformly random architecture (feasible or not)."""
        return {key: self.rng.choice(candidates) for key, candidates in self.space.items()}

    def randoms(self) -> Iterator[Candidate]:
        """An endless stream of random candidates."""
        while True:
            yield Candidate(self.random_arch(), "random")

    def choose(self, proposals: Iterable[Candidate], taken: set[Hashable]) -> Candidate:
        """The first feasible new candidate among the proposals, then random ones; see the class docstring."""
        duplicate = None
        limit = self.max_tries
        for candidate in itertools.chain(itertools.islice(proposals, limit), itertools.islice(self.randoms(), limit)):
            if not self.is_feasible(candidate.arch):
                continue
            if self.canonical(candidate.arch) not in taken:
                return candidate
            duplicate = duplicate or candidate
        if duplicate is None:
            raise ConfigError(f"no architecture within the limits in {self.max_tries} random draws: "
                              f"relax the limits (--max-flops, --max-params, --max-latency-ms)")
        return duplicate


class RandomArchSampler(ArchSampler):
    """The original series' random NAS tuner: uniform random feasible architectures, new ones while any are found."""


class EvolutionSampler(ArchSampler):
    """SPOS evolution: generations of `population` trials bred from the top-k trials of earlier generations.

    A trial's generation is the newest one unless that already has `population` trials that did
    not fail, then the next; its slot (trials of its generation before it) makes it a mutant
    (first `mutations` slots), a uniform crossover (next `crossovers` slots) or random (the rest,
    and all of generation 0). Parents are the `top_k` best complete trials of earlier generations
    (and of trials drawn by other samplers). A mutant re-draws each choice of one parent with
    probability `mutation_prob`; a mutant equal to its parent is a duplicate and is re-drawn.
    The number of generations is the search's budget (population x generations trials).
    """

    def __init__(self, space: Space, *, population: int = 50, top_k: int = 10, mutations: int = 25,
                 crossovers: int = 25, mutation_prob: float = 0.1, seed: int | None = None,
                 is_feasible: Feasible | None = None, max_tries: int = 1000, canonical: Canonical | None = None):
        super().__init__(space, seed=seed, is_feasible=is_feasible, max_tries=max_tries, canonical=canonical)
        for name, value in (("population", population), ("top_k", top_k)):
            if value < 1:
                raise field_error(name, "a positive integer", value)
        for name, value in (("mutations", mutations), ("crossovers", crossovers)):
            if value < 0:
                raise field_error(name, "a non-negative integer", value)
        if mutations + crossovers > population:
            raise field_error("population", f"at least mutations + crossovers = {mutations + crossovers}", population)
        if not 0 <= mutation_prob <= 1:
            raise field_error("mutation_prob", "a probability in [0, 1]", mutation_prob)
        self.population, self.top_k = population, top_k
        self.mutations, self.crossovers, self.mutation_prob = mutations, crossovers, mutation_prob

    def proposals(self, study: Study, trial: FrozenTrial) -> Iterable[Candidate]:
        """Mutants or crossovers of the top-k parents, by this trial's slot in its generation."""
        if len(study.directions) > 1:
            raise ConfigError("the evolution strategy optimises one objective (accuracy); use nsga2 for several")
        trials = study.get_trials(deepcopy=False)
        generation, slot = self.place(trials, trial)
        study._storage.set_trial_system_attr(trial._trial_id, GENERATION_ATTR, generation)
        parents = self.parents(trials, generation, study.direction)
        if not parents or slot >= self.mutations + self.crossovers:
            return ()
        return self.mutants(parents) if slot < self.mutations else self.children(parents)

    def place(self, trials: list[FrozenTrial], trial: FrozenTrial) -> tuple[int, int]:
        """(generation, slot) of a new trial: the newest generation until it holds `population` live trials."""
        generations = [t.system_attrs[GENERATION_ATTR] for t in trials if t.number != trial.number
                       and t.state != TrialState.FAIL and GENERATION_ATTR in t.system_attrs]
        newest = max(generations, default=0)
        used = generations.count(newest)
        return (newest, used) if used < self.population else (newest + 1, 0)

    def parents(self, trials: list[FrozenTrial], generation: int, direction: StudyDirection) -> list[tuple[int, Arch]]:
        """(number, arch) of the top-k complete trials before this generation, best first."""
        earlier = [t for t in trials if t.state == TrialState.COMPLETE
                   and t.system_attrs.get(GENERATION_ATTR, -1) < generation and trial_arch(t, self.space)]
        earlier.sort(key=lambda t: t.value, reverse=direction == StudyDirection.MAXIMIZE)
        return [(t.number, trial_arch(t, self.space)) for t in earlier[:self.top_k]]

    def mutants(self, parents: list[tuple[int, Arch]]) -> Iterator[Candidate]:
        """Endless mutants: a random parent with each choice re-drawn with probability mutation_prob."""
        while True:
            number, arch = self.rng.choice(parents)
            child = {key: self.rng.choice(self.space[key]) if self.rng.random() < self.mutation_prob else value
                     for key, value in arch.items()}
            yield Candidate(child, "mutation", [number])

    def children(self, parents: list[tuple[int, Arch]]) -> Iterator[Candidate]:
        """Endless uniform crossovers of two distinct parents (of the only one, if just one)."""
        while True:
            (n1, a1), (n2, a2) = self.rng.sample(parents, 2) if len(parents) > 1 else parents * 2
            child = {key: a1[key] if self.rng.random() < 0.5 else a2[key] for key in a1}
            yield Candidate(child, "crossover", sorted({n1, n2}))


class FeasibleSampler(ArchSampler):
    """Any Optuna sampler's architectures, redrawn until one is within the limits and new.

    This is how NSGA-II keeps "a candidate over a limit is never evaluated": Optuna's
    constraints_func only ranks trials after they ran (and is deprecated in Optuna 5), and an
    objective that rejects candidates would spend trials and budget on them. Here the wrapped
    sampler proposes (relative sampling, the rest of the choices independently, as Optuna would),
    and infeasible or duplicate proposals are simply drawn again.
    """

    def __init__(self, base: optuna.samplers.BaseSampler, space: Space, *, seed: int | None = None,
                 is_feasible: Feasible | None = None, max_tries: int = 1000, canonical: Canonical | None = None):
        super().__init__(space, seed=seed, is_feasible=is_feasible, max_tries=max_tries, canonical=canonical)
        self.base = base

    def reseed_rng(self) -> None:
        """Reseed the wrapped sampler and our own generator."""
        super().reseed_rng()
        self.base.reseed_rng()

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        """The wrapped sampler's bookkeeping (NSGA-II: its generation)."""
        self.base.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        """The wrapped sampler's bookkeeping."""
        self.base.after_trial(study, trial, state, values)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        """Parameters outside the architecture space come from the wrapped sampler."""
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def proposals(self, study: Study, trial: FrozenTrial) -> Iterator[Candidate]:
        """Endless whole architectures from the wrapped sampler."""
        space = self.infer_relative_search_space(study, trial)
        while True:
            relative = self.base.sample_relative(study, trial, self.base.infer_relative_search_space(study, trial))
            arch = {key: relative[key] if key in relative else self.base.sample_independent(study, trial, key, dist)
                    for key, dist in space.items()}
            yield Candidate(arch, str(self.base))


def arch_sampler(strategy: str, space: Space, *, seed: int | None = None, is_feasible: Feasible | None = None,
                 objectives: Sequence[str] = ("accuracy",), population: int = 50, top_k: int = 10,
                 mutations: int = 25, crossovers: int = 25, mutation_prob: float = 0.1,
                 max_tries: int = 1000, canonical: Canonical | None = None) -> ArchSampler:
    """The sampler for a search strategy; evolution and random take one objective, nsga2 accuracy and a cost."""
    if strategy not in STRATEGIES:
        raise field_error("strategy", f"one of {', '.join(STRATEGIES)}", strategy)
    if (strategy == "nsga2") != (len(objectives) > 1):
        expected = "accuracy and a cost (FLOPs or latency)" if strategy == "nsga2" else "accuracy alone"
        raise field_error("objectives", f"{expected} for strategy {strategy}", list(objectives))
    guard = {"seed": seed, "is_feasible": is_feasible, "max_tries": max_tries, "canonical": canonical}
    if strategy == "random":
        return RandomArchSampler(space, **guard)
    if strategy == "evolution":
        return EvolutionSampler(space, population=population, top_k=top_k, mutations=mutations,
                                crossovers=crossovers, mutation_prob=mutation_prob, **guard)
    return FeasibleSampler(optuna.samplers.NSGAIISampler(population_size=population, seed=seed), space, **guard)
