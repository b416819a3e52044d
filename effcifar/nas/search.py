"""Architecture search over a trained SPOS supernet: an Optuna study whose trials are subnets.

`run_search(SearchConfig(...), "runs/supernet1", "runs/search1")` opens (or resumes) the study
in the output directory's journal file (or the shared PostgreSQL `storage`), then draws
architectures with the strategy's sampler (`effcifar.nas.samplers`: SPOS evolution, the original series'
random tuner, or NSGA-II on the score against FLOPs or latency) until `trials` trials have finished.

Each candidate takes the supernet's weights, its BN statistics are recalibrated (reset, then
`bn_batches` augmented training batches forward in train mode without gradients, cumulative
average) and its top-1/top-5 accuracy is measured on the supernet run's own held-out split:
the `holdout` training images its config set aside (`split_data`, a fixed shuffle), never the
test set. The FLOPs, parameter and latency limits are checked before evaluation: the samplers
never propose a candidate over a limit, and the objective refuses one (failing its trial
unevaluated) should one arrive another way (an enqueued trial).

Latency comes from a per-choice lookup table (`effcifar.nas.latency`) measured on the search's
device before any evaluation and calibrated on whole networks, only when a latency limit or the
latency objective asks for it; it is saved as `latency_table.json` in the output directory and reused on resume if it was made
for the same device and setup (else measured again). Worker processes use the saved table.
Latency is not part of the cached results (it changes which candidates are allowed, not their
accuracy), so each trial records `latency_ms` from the current table.

Results are cached by the canonical architecture key (the choices of the active keys only), so
architectures that differ only in body convs past their skip share one evaluation. Every trial
records its key and results as user attributes; the cache is rebuilt from the study before
each trial, so a resumed study, or several workers sharing it, never evaluate a key twice
(unless two workers draw the same key at the same moment), and the samplers treat
architectures with the same key as duplicates, so they are drawn again while new ones exist.

`export_top` writes `arch/top_{rank}.json`, rank 1 the best (the NNI-style `{key: choice}` under
"arch", with its `rank`, score, loss, accuracy, top-5, FLOPs, parameters, latency when measured,
and the space's declaration under "space") and
`architecture_final.json` for the best; `effcifar.nas.space.load_arch` reads those files or a
plain NNI `{key: choice}` dict back, and `load_arch_file` also the space they embed.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from effcifar.atomic import atomic_write
from effcifar.config import build_config, check_seed, check_threads, check_types, execution, field_error, save_config, setting
from effcifar.data import DeviceLoader, load_dataset
from effcifar.device import PRECISIONS, check_device_name, resolve_device, resolve_precision
from effcifar.errors import ConfigError
from effcifar.nas.costs import CostTable
from effcifar.nas.evaluation import calibration_batches, evaluate_subnet
from effcifar.nas.latency import LATENCY_FILE, VERSION as LATENCY_VERSION, LatencyTable, Target, load_or_measure
from effcifar.nas.network import Supernet
from effcifar.nas.samplers import STRATEGIES, arch_sampler, suggest_arch
from effcifar.nas.space import Arch, ArchSpace, arch_key
from effcifar.nas.supernet import SupernetConfig, load_supernet, read_run_config
from effcifar.rundir import locked, recorded_kind
from effcifar.studies import (
    OnTrial, StorageConfig, check_setup, check_workers, disk_full_is_an_error, open_storage, recorded_study, run_trials,
    start_workers, study_name,
)
from effcifar.train import device_loaders

RESULT_ATTRS = ("arch_key", "accuracy", "top5", "flops", "params")  # of every result ("loss" since scoring by it)
SCORES = {"accuracy": "accuracy", "loss": "neg_loss"}  # what a candidate is judged by -> the maximised trial attribute
COSTS = {"flops": "flops", "latency": "latency_ms"}  # nsga2's cost objective -> the trial attribute
SETUP_ATTR = "search:setup"
CONFIG_FILE = "search.yaml"


@dataclass
class SearchConfig(StorageConfig):
    """One architecture search; the defaults are the original series' SPOS evolution (50 x 20 generations)."""

    # Old field names, accepted with a warning (`effcifar.config.read_layer`).
    RENAMED_FIELDS: ClassVar[dict[str, str]] = {"evaluations": "trials", "top_k": "parents", "top_k_export": "export",
                                                "seed": "sampler_seed"}

    strategy: str = setting("evolution", "how candidates are drawn: SPOS evolution, uniform random, or NSGA-II "
                                         "(score against `cost`)", STRATEGIES)
    trials: int = setting(1000, "budget of finished trials (candidates judged), across restarts (evolution: "
                                "population x generations)")
    population: int = setting(50, "evolution and NSGA-II: candidates per generation")
    parents: int = setting(10, "evolution: the best candidates so far that parent the next generation")
    mutations: int = setting(25, "evolution: children per generation made by mutating a parent")
    crossovers: int = setting(25, "evolution: children per generation made by crossing two parents")
    mutation_prob: float = setting(0.1, "evolution: probability that a mutation changes each choice")
    max_flops: float | None = setting(None, "forward FLOPs per image; candidates above are never evaluated")
    max_params: float | None = setting(None, "trainable parameters; candidates above are never evaluated")
    max_latency_ms: float | None = setting(None, "forward milliseconds per `latency_batch` images (lookup table "
                                                 "measured on the device); candidates above are never evaluated")
    cost: str = setting("flops", "nsga2's second objective", tuple(COSTS))
    latency_batch: int = setting(1, "images per timed forward (1: one image at a time, as deployed)")
    bn_batches: int | None = setting(None, "BN recalibration batches before each evaluation (default: the supernet "
                                           "run's)")
    eval_images: int = setting(0, "score each candidate on this many held-out images, a seeded random sample "
                                  "(0: all)")
    score: str = setting("loss", "judge candidates by (negative) held-out mean cross-entropy, or by accuracy",
                         tuple(SCORES))
    workers: int = execution(1, "search processes on this machine")
    sampler_seed: int | None = setting(0, "seed of the sampler that draws candidates (worker i uses seed + i)")
    export: int = setting(5, "best distinct architectures written to arch/top_1.json .. top_{export}.json")
    device: str = execution("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    precision: str = setting("auto", "autocast precision of the evaluations", PRECISIONS)
    eval_batch_size: int | None = execution(None, "images per evaluation batch (default: the supernet run's)")
    threads: int = execution(0, "torch threads (0: torch's default; workers split the cores)")

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for the first bad value."""
        check_types(self)
        check_seed("sampler_seed", self.sampler_seed)
        if self.strategy not in STRATEGIES:
            raise field_error("strategy", f"one of {', '.join(STRATEGIES)}", self.strategy)
        check_workers(self.workers)
        for name in ("trials", "population", "parents", "export", "latency_batch"):
            if getattr(self, name) < 1:
                raise field_error(name, "a positive integer", getattr(self, name))
        for name in ("mutations", "crossovers", "eval_images"):
            if getattr(self, name) < 0:
                raise field_error(name, "an integer >= 0", getattr(self, name))
        check_threads("threads", self.threads)
        if self.mutations + self.crossovers > self.population:
            raise field_error("population", f"at least mutations + crossovers = {self.mutations + self.crossovers}",
                              self.population)
        if self.strategy == "evolution" and self.parents > self.population:
            raise field_error("parents", f"at most population = {self.population} with strategy evolution",
                              self.parents)
        if self.strategy == "evolution" and self.mutations + self.crossovers == 0:
            raise field_error("mutations", "mutations + crossovers >= 1 with strategy evolution (none: it never "
                                           "evolves; use strategy random)", self.mutations)
        if not 0 <= self.mutation_prob <= 1:
            raise field_error("mutation_prob", "a probability in [0, 1]", self.mutation_prob)
        for name in ("max_flops", "max_params", "max_latency_ms"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise field_error(name, "a positive number or none", getattr(self, name))
        for name in ("bn_batches", "eval_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise field_error(name, "a positive integer or none (the supernet run's)", getattr(self, name))
        super().validate()
        if self.precision not in PRECISIONS:
            raise field_error("precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        if self.score not in SCORES:
            raise field_error("score", f"one of {', '.join(SCORES)}", self.score)
        check_device_name(self.device)
        if self.cost not in COSTS:
            raise field_error("cost", f"one of {', '.join(COSTS)}", self.cost)
        if self.cost != "flops" and self.strategy != "nsga2":
            raise field_error("cost", "flops unless strategy is nsga2 (the only one with a cost objective)", self.cost)

    def objectives(self) -> tuple[str, ...]:
        """What the study optimises: accuracy, and for nsga2 the cost (trial attributes flops or latency_ms)."""
        return (SCORES[self.score], COSTS[self.cost]) if self.strategy == "nsga2" else (SCORES[self.score],)

    def needs_latency(self) -> bool:
        """Whether the search measures a latency table: a latency limit or the latency objective."""
        return self.max_latency_ms is not None or "latency_ms" in self.objectives()


def score_text(score: str, value: float) -> str:
    """A candidate's score as users read it: "held-out loss 1.234" (the score is its negative) or "held-out accuracy
    45.10%"."""
    return f"held-out accuracy {value:.2%}" if score == "accuracy" else f"held-out loss {-value:.3f}"


@dataclass(frozen=True)
class Evaluation:
    """One candidate's results."""

    arch_key: str
    accuracy: float  # top-1 on the supernet run's held-out split
    top5: float
    flops: int
    params: int
    loss: float | None = None  # mean cross-entropy there (None in results recorded before it was)

    @property
    def neg_loss(self) -> float | None:
        return None if self.loss is None else -self.loss

    def attrs(self) -> dict[str, Any]:
        """The trial user attributes that persist this result (and the cache)."""
        return {name: getattr(self, name) for name in (*RESULT_ATTRS, "loss", "neg_loss")}

    def score(self, name: str) -> float:
        """The figure `name` (see SCORES) judges by."""
        return getattr(self, SCORES[name])


class CandidateEvaluator:
    """Judges subnets of a trained supernet on its run's held-out split, once per canonical architecture.

    Holds the supernet, the held-out loader, the BN calibration batches (the supernet run's
    augmented training batches, drawn as the run drew its own), the cost table, the latency table
    (when the search measures latency) and the cache. `evaluated` lists the architectures actually
    evaluated (not served from the cache).
    """

    def __init__(self, net: Supernet, space: ArchSpace, costs: CostTable, loader: DeviceLoader,
                 bn_batches: list[torch.Tensor], autocast: Callable[[], Any],
                 max_flops: float | None = None, max_params: float | None = None,
                 latency: LatencyTable | None = None, max_latency_ms: float | None = None):
        if max_latency_ms is not None and latency is None:
            raise ValueError("a latency limit needs a latency table")
        self.net, self.space, self.costs, self.loader = net, space, costs, loader
        self.bn_batches, self.autocast = bn_batches, autocast
        self.max_flops, self.max_params = max_flops, max_params
        self.latency, self.max_latency_ms = latency, max_latency_ms
        self.cache: dict[str, Evaluation] = {}
        self.evaluated: list[Arch] = []

    @classmethod
    def from_run(cls, supernet_dir: str | Path, config: SearchConfig,
                 out_dir: str | Path | None = None) -> CandidateEvaluator:
        """Load a finished supernet run and rebuild its data split on the configured device.

        If the search measures latency, the table saved in `out_dir` is reused when it matches
        the device and setup; otherwise it is measured here (nothing is written).
        """
        net, space, sconfig = load_supernet(supernet_dir)
        device = resolve_device(config.device)
        precision = resolve_precision(config.precision, device)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        net = net.to(device)
        if sconfig.channels_last:
            net = net.to(memory_format=torch.channels_last)
        data = load_dataset(sconfig.dataset, sconfig.data_dir)
        train_config = replace(sconfig.train_config(),
                              eval_batch_size=config.eval_batch_size or sconfig.eval_batch_size)
        train_loader, valid_loader = device_loaders(train_config, data, device)
        bn_batches = config.bn_batches or sconfig.evaluation.bn_batches
        batches = calibration_batches(train_loader, bn_batches, sconfig.seed + 1)
        if config.eval_images:
            valid_loader = valid_loader.subset(config.eval_images, sconfig.seed)
        costs = CostTable.build(net.space, sconfig.channels(), data.num_classes)
        latency = None
        if config.needs_latency():
            target = Target(device, amp_dtype, sconfig.channels_last, config.latency_batch)
            saved = None if out_dir is None else Path(out_dir) / LATENCY_FILE
            latency = load_or_measure(saved, space, sconfig.channels(), data.num_classes, target)

        def autocast() -> torch.autocast:
            return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

        return cls(net, space, costs, valid_loader, batches, autocast, config.max_flops, config.max_params,
                   latency, config.max_latency_ms)

    def key(self, arch: Mapping[str, str]) -> str:
        """The key of the path the supernet runs for `arch` (`arch_key`: its active choices)."""
        return arch_key(self.space, arch)

    def is_feasible(self, arch: Mapping[str, str]) -> bool:
        """Whether the architecture is within the FLOPs, parameter and latency limits (from the tables)."""
        return ((self.max_flops is None or self.costs.flops_of(arch) <= self.max_flops)
                and (self.max_params is None or self.costs.params_of(arch) <= self.max_params)
                and (self.max_latency_ms is None or self.latency.latency_of(arch) <= self.max_latency_ms))

    def check_limits(self) -> None:
        """ConfigError unless the subnet with the fewest FLOPs, or the fastest, is within the limits."""
        smallest = self.costs.extreme(False, self.space)
        fastest = self.latency.fastest(self.space) if self.latency else smallest
        if not (self.is_feasible(smallest) or self.is_feasible(fastest)):
            fastest_text = f"; the fastest takes {self.latency.latency_of(fastest):.3f} ms" if self.latency else ""
            raise ConfigError(
                f"no architecture within --max-flops {self.max_flops} / --max-params {self.max_params} / "
                f"--max-latency-ms {self.max_latency_ms}: the smallest has {self.costs.flops_of(smallest):,} FLOPs "
                f"and {self.costs.params_of(smallest):,} parameters{fastest_text}")

    def sync(self, trials: list[FrozenTrial]) -> None:
        """Add the results recorded by finished trials (earlier runs, other workers) to the cache."""
        for t in trials:
            if t.state == TrialState.COMPLETE and all(name in t.user_attrs for name in RESULT_ATTRS):
                result = Evaluation(**{name: t.user_attrs[name] for name in RESULT_ATTRS}, loss=t.user_attrs.get("loss"))
                self.cache.setdefault(result.arch_key, result)

    def evaluate(self, arch: Mapping[str, str]) -> tuple[Evaluation, bool]:
        """(results, served from the cache) of one architecture; it must be within the limits."""
        arch = self.space.check(arch)
        if not self.is_feasible(arch):
            raise ValueError(f"over the limits, not evaluated: {self.key(arch)}")
        key = self.key(arch)
        if key in self.cache:
            return self.cache[key], True
        top1, top5, loss = evaluate_subnet(self.net, arch, self.bn_batches, self.loader, self.autocast)
        self.evaluated.append(arch)
        result = Evaluation(key, top1, top5, self.costs.flops_of(arch), self.costs.params_of(arch), loss)
        self.cache[key] = result
        return result, False


def setup_values(config: SearchConfig, supernet_dir: Path) -> dict[str, Any]:
    """What the recorded results mean: the supernet run, how candidates are evaluated, the objectives.

    Limits (FLOPs, parameters, latency) only decide which candidates are drawn, not their
    results, so they may change when a search is resumed; the latency batch and the table's
    method (version) count only when latency is an objective.
    """
    sconfig = load_supernet_config(supernet_dir)
    values = {"supernet": str(supernet_dir.resolve()),
              "bn_batches": config.bn_batches or sconfig.evaluation.bn_batches,
              "precision": config.precision, "objectives": config.objectives()}
    if config.eval_images:  # absent when 0, so searches recorded before the field existed still resume
        values["eval_images"] = config.eval_images
    if "latency_ms" in config.objectives():  # the values told to the study are latencies at this batch
        values |= {"latency_batch": config.latency_batch, "latency_version": LATENCY_VERSION}
    return values


def load_supernet_config(supernet_dir: Path) -> SupernetConfig:
    """The supernet run's config, after checking the directory holds a finished run."""
    if not (supernet_dir / "supernet.pt").is_file() or not (supernet_dir / "config.yaml").is_file():
        kind = recorded_kind(supernet_dir)
        hint = (f"it is a {kind} run" if kind not in (None, "supernet") else
                f"train one with `effcifar supernet train --out {supernet_dir}`, or finish it with --resume")
        raise ConfigError(f"{supernet_dir}: not a finished supernet run (expected supernet.pt and config.yaml; "
                          f"{hint})")
    return read_run_config(supernet_dir)


def search_sampler(config: SearchConfig, space: ArchSpace, is_feasible: Callable[[Arch], bool],
                   seed: int | None) -> optuna.samplers.BaseSampler:
    """The strategy's sampler over the space, never proposing an infeasible architecture."""
    return arch_sampler(config.strategy, space.choices(), seed=seed, is_feasible=is_feasible,
                        canonical=functools.partial(arch_key, space), objectives=config.objectives(),
                        population=config.population, top_k=config.parents, mutations=config.mutations,
                        crossovers=config.crossovers, mutation_prob=config.mutation_prob)


def open_search_study(config: SearchConfig, supernet_dir: Path, out_dir: Path, space: ArchSpace,
                      is_feasible: Callable[[Arch], bool], worker: int = 0) -> optuna.Study:
    """Create or load the study; a resumed study must have been made for the same supernet and evaluation."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = search_sampler(config, space, is_feasible,
                             None if config.sampler_seed is None else config.sampler_seed + worker)
    directions = ["maximize", "minimize"] if config.strategy == "nsga2" else ["maximize"]
    storage = open_storage(config, out_dir)
    study = optuna.create_study(storage=storage, study_name=config.study or out_dir.name, sampler=sampler,
                                directions=directions, load_if_exists=True)
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise ConfigError(f"{out_dir}: the study was made with other objectives; use its own strategy or a new --out")
    check_setup(study, SETUP_ATTR, setup_values(config, supernet_dir), str(out_dir),
                "supernet run, evaluation setup or objectives")
    return study


def run_worker(config: SearchConfig, supernet_dir: str | Path, out_dir: str | Path, worker: int = 0,
               on_trial: OnTrial | None = None, evaluator: CandidateEvaluator | None = None) -> None:
    """Take trials until the budget is spent: draw, check, evaluate or reuse, tell."""
    supernet_dir, out_dir = Path(supernet_dir), Path(out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    evaluator = evaluator or CandidateEvaluator.from_run(supernet_dir, config, out_dir)
    study = open_search_study(config, supernet_dir, out_dir, evaluator.space, evaluator.is_feasible, worker)
    choices = evaluator.space.choices()

    def objective(trial: optuna.Trial) -> FrozenTrial:
        try:
            arch = suggest_arch(trial, choices)
        except ConfigError as e:
            trial.set_user_attr("fail_reason", str(e))
            study.tell(trial, state=TrialState.FAIL)
            raise
        return evaluate_trial(study, trial, arch, evaluator, config.objectives())

    run_trials(study, config, out_dir, config.trials, objective, seed=config.sampler_seed, worker=worker,
               sampler=lambda seed: search_sampler(config, evaluator.space, evaluator.is_feasible, seed),
               on_trial=on_trial, max_failures=config.trials)  # a failed (interrupted) trial judged nothing


def evaluate_trial(study: optuna.Study, trial: optuna.Trial, arch: Arch, evaluator: CandidateEvaluator,
                   objectives: tuple[str, ...]) -> FrozenTrial:
    """One trial: refuse it over a limit, else evaluate (or reuse the cached result) and record it."""
    if not evaluator.is_feasible(arch):
        trial.set_user_attr("fail_reason", "over the FLOPs/parameter/latency limits (not evaluated)")
        return study.tell(trial, state=TrialState.FAIL)
    evaluator.sync(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    result, cached = evaluator.evaluate(arch)
    record = {**result.attrs(), "cached": cached}
    if evaluator.latency is not None:
        record["latency_ms"] = evaluator.latency.latency_of(arch)
    for name, value in record.items():
        trial.set_user_attr(name, value)
    return study.tell(trial, [record[name] for name in objectives])


def run_search(config: SearchConfig, supernet_dir: str | Path, out_dir: str | Path,
               on_trial: OnTrial | None = None) -> optuna.Study:
    """Run (or resume) the search in `out_dir` with `config.workers` processes; export the top K; return the study."""
    config.validate()
    supernet_dir, out_dir = Path(supernet_dir), Path(out_dir)
    load_supernet_config(supernet_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    with locked(out_dir, "search"), disk_full_is_an_error(out_dir):
        evaluator = CandidateEvaluator.from_run(supernet_dir, config, out_dir)
        evaluator.check_limits()  # before any file is written
        storage = open_storage(config, out_dir)
        config = replace(config, study=study_name(storage, config, out_dir,
                                                  recorded_study(out_dir / CONFIG_FILE, SearchConfig)))
        study = open_search_study(config, supernet_dir, out_dir, evaluator.space, evaluator.is_feasible)
        if evaluator.latency is not None:
            evaluator.latency.save(out_dir / LATENCY_FILE)  # the workers' table
        save_config(config.without_password(), out_dir / CONFIG_FILE)  # never the database password
        atomic_write(out_dir / "supernet.txt", f"{supernet_dir.resolve()}\n")
        if config.workers == 1:
            run_worker(config, supernet_dir, out_dir, on_trial=on_trial, evaluator=evaluator)
        else:
            threads = config.threads or max(1, (os.cpu_count() or 1) // config.workers)
            start_workers(study, config.workers, run_worker,
                          (replace(config, threads=threads), supernet_dir, out_dir), on_trial, config.storage)
        export_top(study, out_dir, config.export, evaluator.space, evaluator.latency, evaluator.is_feasible)
    return study


# ---------------------------------------------------------------------------------------------
# Export


def ranked_results(trials: list[FrozenTrial]) -> list[tuple[FrozenTrial, dict[str, Any]]]:
    """(first trial, record) per distinct canonical architecture of the complete trials.

    Best by the study's first objective (the score: accuracy or -loss) first, then top-5, then fewest FLOPs.
    """
    best: dict[str, tuple[FrozenTrial, dict[str, Any]]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state != TrialState.COMPLETE or not all(name in t.user_attrs for name in RESULT_ATTRS):
            continue
        record = {"arch": dict(t.params), **{name: t.user_attrs[name] for name in RESULT_ATTRS if name != "arch_key"}}
        if "loss" in t.user_attrs:
            record["loss"] = t.user_attrs["loss"]
        best.setdefault(t.user_attrs["arch_key"], (t, record))
    return sorted(best.values(),
                  key=lambda pair: (-pair[0].values[0], -pair[1]["top5"], pair[1]["flops"], pair[0].number))


def top_records(study: optuna.Study, k: int, latency: LatencyTable | None = None,
                within: Callable[[Mapping[str, str]], bool] | None = None) -> list[dict[str, Any]]:
    """The records of the best k distinct architectures (best first), with their rank (1: the best), score (what
    ranked them: the study's first objective) and trial number.

    With `latency`, each record has `latency_ms` from that table (the one in the search directory,
    so the figures agree with it even if an earlier run of the search used another). With `within`
    (the current limits), only architectures it accepts: a study resumed under a tighter limit keeps
    the trials it ran before, but exports none above the limit.
    """
    ranked = [pair for pair in ranked_results(study.get_trials(deepcopy=False))
              if within is None or within(pair[1]["arch"])][:k]
    extra = (lambda record: {"latency_ms": latency.latency_of(record["arch"])}) if latency else (lambda record: {})
    return [{"rank": rank, **record, **extra(record), "score": t.values[0], "trial": t.number}
            for rank, (t, record) in enumerate(ranked, 1)]


def export_top(study: optuna.Study, out_dir: str | Path, k: int, space: ArchSpace | None = None,
               latency: LatencyTable | None = None,
               within: Callable[[Mapping[str, str]], bool] | None = None) -> list[dict[str, Any]]:
    """Write arch/top_{1..k}.json (top_1 is the best) and architecture_final.json; return the records written.

    With `space`, each record also holds its declaration under "space", so the file alone
    rebuilds the network (`effcifar train --arch`); with `latency`, its `latency_ms`.
    """
    out_dir = Path(out_dir)
    records = top_records(study, k, latency, within)
    if space is not None:
        records = [{**record, "space": space.to_dict()} for record in records]
    for record in records:
        atomic_write(out_dir / "arch" / f"top_{record['rank']}.json", json.dumps(record, indent=2) + "\n")
    for stale in (out_dir / "arch").glob("top_*.json"):  # of an earlier export (top_0: numbered from 0 before)
        index = stale.stem.removeprefix("top_")
        if index.isdigit() and not 1 <= int(index) <= len(records):
            stale.unlink()
    if records:
        atomic_write(out_dir / "architecture_final.json", json.dumps(records[0], indent=2) + "\n")
    return records
