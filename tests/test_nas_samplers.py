"""Architecture samplers through real Optuna studies: search quality, limits, duplicates, resume, shared storage."""

import random
import statistics
import threading

import optuna
import pytest
from optuna.trial import TrialState

from effcifar.errors import ConfigError
from effcifar.nas.samplers import (
    ARCH_ATTR, GENERATION_ATTR, ORIGIN_ATTR, PARENTS_ATTR, EvolutionSampler, FeasibleSampler, RandomArchSampler,
    arch_sampler, suggest_arch,
)

SMALL = {"population": 20, "top_k": 5, "mutations": 8, "crossovers": 8}


def seed_space():
    """The seed's SPOS space: 15 choice keys, about two million architectures."""
    space = {}
    for s in (1, 2, 3):
        space[f"stage{s}.conv1"] = ["conv3_pool", "conv5_pool", "conv3_stride2", "conv5_stride2"]
        for c in (2, 3, 4):
            space[f"stage{s}.conv{c}"] = ["conv3", "conv5"]
        space[f"stage{s}.skip"] = ["zero", "conv3_input", "conv4_input", "conv4_output"]
    return space


SPACE = seed_space()


def matches(target):
    """Synthetic fitness: how many choices equal the hidden target (optimum: 15)."""
    return lambda arch: sum(arch[k] == target[k] for k in SPACE)


def no_conv5_in_stage3(arch):
    return not any(v.startswith("conv5") for k, v in arch.items() if k.startswith("stage3."))


def search(study, fitness, trials, seen=None, stop_at=None):
    """Run an architecture objective; `seen` collects every architecture the objective evaluated."""
    def objective(trial):
        arch = suggest_arch(trial, SPACE)
        if seen is not None:
            seen.append(arch)
        return fitness(arch)

    def stop(study, trial):
        if trial.values is not None and trial.values[0] == stop_at:
            study.stop()

    study.optimize(objective, n_trials=trials, callbacks=[stop])
    return study


def evaluations_to_optimum(sampler, seed, budget):
    study = optuna.create_study(direction="maximize", sampler=sampler)
    search(study, matches({k: random.Random(seed).choice(v) for k, v in SPACE.items()}), budget, stop_at=len(SPACE))
    return len(study.trials) if study.best_value == len(SPACE) else budget + 1


@pytest.mark.slow
def test_evolution_finds_the_optimum_in_fewer_evaluations_than_random():
    budget = 500
    evolution = [evaluations_to_optimum(EvolutionSampler(SPACE, seed=s, **SMALL), s, budget) for s in range(5)]
    rand = [evaluations_to_optimum(RandomArchSampler(SPACE, seed=s), s, budget) for s in range(5)]
    assert statistics.median(evolution) <= budget  # found
    assert statistics.median(evolution) < statistics.median(rand)


@pytest.mark.parametrize("strategy", ["evolution", "random", "nsga2"])
def test_no_candidate_over_a_limit_is_evaluated(strategy):
    objectives = ("accuracy", "flops") if strategy == "nsga2" else ("accuracy",)
    sampler = arch_sampler(strategy, SPACE, seed=0, is_feasible=no_conv5_in_stage3, objectives=objectives,
                           population=10, top_k=4, mutations=4, crossovers=4)
    study = optuna.create_study(directions=["maximize", "minimize"][:len(objectives)], sampler=sampler)
    fitness = matches({k: v[-1] for k, v in SPACE.items()})  # the optimum itself is over the limit
    cost = lambda arch: sum(v.startswith("conv5") for v in arch.values())  # noqa: E731
    seen = []
    search(study, (lambda a: (fitness(a), cost(a))) if strategy == "nsga2" else fitness, 60, seen)
    assert len(seen) == 60 and all(no_conv5_in_stage3(arch) for arch in seen)
    assert len({tuple(a.values()) for a in seen}) == 60  # and none twice
    assert all(t.system_attrs[ARCH_ATTR] == t.params for t in study.trials)


def test_evolution_generations_slots_and_parents():
    sampler = EvolutionSampler(SPACE, seed=1, population=10, top_k=3, mutations=4, crossovers=3)
    study = search(optuna.create_study(direction="maximize", sampler=sampler), matches(random_target(1)), 30)
    check_generations(study, population=10, top_k=3, mutations=4, crossovers=3)


def random_target(seed):
    return {k: random.Random(seed).choice(v) for k, v in SPACE.items()}


def check_generations(study, population, top_k, mutations, crossovers):
    """Generation sizes, the operator of each slot, parents from the top-k of earlier generations, no duplicates."""
    trials = study.get_trials(states=[TrialState.COMPLETE])
    generations = [t.system_attrs[GENERATION_ATTR] for t in trials]
    assert generations == sorted(generations) and set(generations) == set(range(len(trials) // population))
    assert all(generations.count(g) == population for g in set(generations))
    assert len({tuple(t.params.values()) for t in trials}) == len(trials)
    for g in set(generations) - {0}:
        earlier = sorted((t for t in trials if t.system_attrs[GENERATION_ATTR] < g), key=lambda t: -t.value)
        best = {t.number for t in earlier[:top_k]}
        current = [t for t in trials if t.system_attrs[GENERATION_ATTR] == g]
        origins = [t.system_attrs[ORIGIN_ATTR] for t in current]
        assert origins == ["mutation"] * mutations + ["crossover"] * crossovers + ["random"] * (
            population - mutations - crossovers)
        for t in current:
            parents = [study.trials[n] for n in t.system_attrs[PARENTS_ATTR]]
            assert {p.number for p in parents} <= best
            if t.system_attrs[ORIGIN_ATTR] == "crossover":
                assert all(t.params[k] in {p.params[k] for p in parents} for k in SPACE)
            if t.system_attrs[ORIGIN_ATTR] == "mutation":
                assert t.params != parents[0].params


def journal(path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def test_evolution_resumes_from_a_journal_with_a_new_sampler(tmp_path):
    settings = {"population": 10, "top_k": 3, "mutations": 4, "crossovers": 3}
    fitness = matches(random_target(2))
    first = optuna.create_study(storage=journal(tmp_path / "s.journal"), study_name="s", direction="maximize",
                                sampler=EvolutionSampler(SPACE, seed=0, **settings))
    search(first, fitness, 15)  # stops halfway through generation 1
    resumed = optuna.load_study(storage=journal(tmp_path / "s.journal"), study_name="s",
                                sampler=EvolutionSampler(SPACE, seed=5, **settings))
    search(resumed, fitness, 15)
    assert [t.system_attrs[GENERATION_ATTR] for t in resumed.trials] == [0] * 10 + [1] * 10 + [2] * 10
    check_generations(resumed, **settings)


def test_two_workers_on_one_journal_draw_unique_architectures(tmp_path):
    settings = {"population": 10, "top_k": 3, "mutations": 4, "crossovers": 3}
    fitness = matches(random_target(3))
    lock = threading.Lock()  # the search's budget lock: drawing is serialised, evaluating is not

    def worker(seed):
        study = optuna.create_study(storage=journal(tmp_path / "s.journal"), study_name="s", direction="maximize",
                                    sampler=EvolutionSampler(SPACE, seed=seed, **settings), load_if_exists=True)
        for _ in range(20):
            with lock:
                trial = study.ask()
                arch = suggest_arch(trial, SPACE)
            study.tell(trial, fitness(arch))

    threads = [threading.Thread(target=worker, args=(0,)) for _ in range(2)]
    with lock:  # create the study once, so that both workers load it
        optuna.create_study(storage=journal(tmp_path / "s.journal"), study_name="s", direction="maximize")
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    study = optuna.load_study(storage=journal(tmp_path / "s.journal"), study_name="s")
    archs = [tuple(t.params.values()) for t in study.trials]
    assert len(archs) == 40 and len(set(archs)) == 40  # same seed in both workers, still no repeats
    assert sorted(t.system_attrs[GENERATION_ATTR] for t in study.trials) == sorted(list(range(4)) * 10)


def test_interleaved_asks_see_each_others_architectures():
    study = optuna.create_study(direction="maximize", sampler=RandomArchSampler(SPACE, seed=0))
    other = optuna.load_study(study_name=study.study_name, storage=study._storage,
                              sampler=RandomArchSampler(SPACE, seed=0))
    a, b = study.ask(), other.ask()
    first_key = next(iter(SPACE))
    a.suggest_categorical(first_key, SPACE[first_key])  # a has drawn its architecture but set one param
    arch_b = suggest_arch(b, SPACE)
    assert arch_b != suggest_arch(a, SPACE)  # same seed: only the recorded arch tells them apart


def test_a_small_space_is_exhausted_without_repeats_then_repeats():
    space = {"a": ["x", "y"], "b": ["x", "y", "z"]}
    seen = []
    study = optuna.create_study(direction="maximize", sampler=EvolutionSampler(space, seed=0, population=3, top_k=2,
                                                                               mutations=1, crossovers=1))

    def objective(trial):
        seen.append(tuple(suggest_arch(trial, space).values()))
        return len(seen)

    study.optimize(objective, n_trials=8)
    assert len(set(seen[:6])) == 6 and set(seen[6:]) <= set(seen[:6])


@pytest.mark.parametrize("sampler", [
    lambda f: EvolutionSampler(SPACE, is_feasible=f, max_tries=50),
    lambda f: RandomArchSampler(SPACE, is_feasible=f, max_tries=50),
    lambda f: FeasibleSampler(optuna.samplers.NSGAIISampler(), SPACE, is_feasible=f, max_tries=50),
])
def test_no_feasible_architecture_is_a_config_error(sampler):
    study = optuna.create_study(direction="maximize", sampler=sampler(lambda arch: False))
    with pytest.raises(ConfigError, match="relax the limits"):
        study.optimize(lambda trial: len(suggest_arch(trial, SPACE)), n_trials=1)


def test_arch_sampler_checks_strategy_objectives_and_settings():
    with pytest.raises(ConfigError, match="evolution, random, nsga2") as e:
        arch_sampler("grid", SPACE)
    assert e.value.field == "strategy"
    with pytest.raises(ConfigError, match="objectives"):
        arch_sampler("evolution", SPACE, objectives=("accuracy", "flops"))
    with pytest.raises(ConfigError, match="objectives"):
        arch_sampler("nsga2", SPACE)
    with pytest.raises(ConfigError, match="mutation_prob"):
        arch_sampler("evolution", SPACE, mutation_prob=1.5)
    with pytest.raises(ConfigError, match="population"):
        arch_sampler("evolution", SPACE, population=20)  # fewer than 25 + 25 operator slots
    with pytest.raises(ConfigError, match="stage1.conv1"):
        RandomArchSampler({**SPACE, "stage1.conv1": []})
    assert isinstance(arch_sampler("nsga2", SPACE, objectives=("accuracy", "latency")).base,
                      optuna.samplers.NSGAIISampler)


def test_evolution_refuses_a_multi_objective_study():
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=EvolutionSampler(SPACE))
    with pytest.raises(ConfigError, match="nsga2"):
        study.optimize(lambda trial: (1.0, len(suggest_arch(trial, SPACE))), n_trials=1)


@pytest.mark.parametrize("strategy", ["random", "evolution"])
def test_canonical_key_makes_equivalent_architectures_duplicates(strategy):
    space = {"a": ["x", "y"], "b": ["1", "2", "3", "4", "5"]}
    study = optuna.create_study(direction="maximize", sampler=arch_sampler(
        strategy, space, seed=0, canonical=lambda arch: arch["a"], population=2, top_k=1, mutations=1, crossovers=0))
    seen = []
    study.optimize(lambda trial: seen.append(suggest_arch(trial, space)) or 0.0, n_trials=2)
    assert {arch["a"] for arch in seen} == {"x", "y"}  # only "a" makes two architectures different
