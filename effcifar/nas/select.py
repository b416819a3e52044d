"""Selection by real training: the supernet proposes, standalone training at rising fidelity decides.

A supernet's score is a proxy; its top-1 is not checked by anything. `run_selection` turns the
search's best `pool` distinct networks under the cost limits (or, as a control, random networks
under them) plus the **incumbent** — the hand-designed ResNet-9 at the supernet's widths, when
the space can express it — into an Optuna study through the same worker loop as HPO (workers,
PostgreSQL, resume, the run-directory lock). Each trial trains one candidate standalone on the
supernet run's held-out split for the final budget, reporting held-out accuracy after every
epoch to Optuna's `SuccessiveHalvingPruner`: epochs are the resource, and from `min_epochs` on
only the best 1/`reduction` of the candidates that reached a rung train on. The incumbent is a
fixed arm that is never pruned, so a proposal must beat it at every rung to stay, and the answer
can never be worse on held-out images than the network the user started with. The points of
the width curve (the incumbent at fractions of its widths) train the whole budget too, as the
reference a smaller proposal must lie above to pay; they take no place at the rungs.

The answer is the best candidate that finished the last rung, by held-out accuracy (fewer FLOPs
on a tie). Test accuracy is recorded for every finished candidate and reported, never used to
choose. `select.json` holds every candidate's rungs and the answer; `answer.json` is the answer's
architecture file (with its space), usable as `effcifar train --arch`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from effcifar.atomic import atomic_write
from effcifar.config import check_seed, check_types, execution, field_error, result_values, save_config, setting
from effcifar.data import CifarData, load_dataset
from effcifar.errors import ConfigError
from effcifar.models import NETWORK_STAGES, count_flops, count_parameters
from effcifar.nas.costs import CostTable
from effcifar.nas.space import Arch, ArchSpace, HeadSpec, network_key, width_channels
from effcifar.rundir import clear, locked
from effcifar.studies import (
    FINISHED, OnTrial, StorageConfig, check_setup, check_workers, current_trials, open_storage, recorded_study,
    retried_numbers, run_trials, start_workers, study_name,
)
from effcifar.train import EpochMetrics, TrainConfig, finished_summary, read_logs, recipe_for, train

PROPOSALS = ("search", "random")
INCUMBENT = "incumbent"
CURVE = "width curve"  # the source of the width curve's arms
FIXED_ARMS = ("incumbent", "baseline", CURVE)  # sources of arms that train the whole budget, never pruned
CONFIG_FILE = "select.yaml"
SETUP_ATTR = "select:setup"
RESULT_FILE = "select.json"
ANSWER_FILE = "answer.json"
FRONT_FILE = "front.json"
TRIALS_DIR, ARCHS_DIR = "trials", "archs"  # each candidate's run, and its architecture file
FRONT_EXPECTED = "comma-separated FLOPs limits (distinct, positive), e.g. 12e6,30e6,48e6"


@dataclass
class SelectConfig(StorageConfig):
    """One selection: which candidates, how fidelity rises, the cost limits; where the study lives (StorageConfig)."""

    pool: int = setting(4, "proposals: the search's best distinct networks under the limits (or random ones)")
    proposals: str = setting("search", "where proposals come from: the search's ranking by supernet score, or "
                                       "uniform random networks under the limits (a control)", PROPOSALS)
    incumbent: bool = setting(True, "add the ResNet-9 at the supernet's widths as a fixed arm that is never pruned")
    width_curve: str = setting("0.5,0.75", "comma-separated fractions of the base network's widths, each trained as "
                                           "a fixed arm: the width-scaled baseline a proposal must lie above (empty: "
                                           "none)")
    min_epochs: int = setting(1, "the first rung, in epochs; later rungs at min_epochs x reduction^k")
    reduction: int = setting(3, "successive halving's reduction factor: the best 1/reduction of a rung train on")
    margin: float = setting(1.0, "standard errors of the held-out difference by which a candidate must lead to "
                                 "overturn one earlier in the pool (the incumbent first, then the search's ranking; "
                                 "0: the best held-out accuracy wins)")
    max_flops: float | None = setting(None, "forward FLOPs per image; candidates above are not trained (none: no "
                                            "limit)")
    max_params: float | None = setting(None, "trainable parameters; candidates above are not trained (none: no limit)")
    max_latency_ms: float | None = setting(None, "forward milliseconds per image on the search's device (its latency "
                                                 "table; none: no limit)")
    proposal_seed: int = setting(0, "seeds the random proposals")
    workers: int = execution(1, "training processes on this machine")

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for the first bad value."""
        check_types(self)
        if self.pool < 1:
            raise field_error("pool", "a positive integer", self.pool)
        if self.proposals not in PROPOSALS:
            raise field_error("proposals", f"one of {', '.join(PROPOSALS)}", self.proposals)
        if self.min_epochs < 1:
            raise field_error("min_epochs", "a positive integer", self.min_epochs)
        if self.reduction < 2:
            raise field_error("reduction", "an integer >= 2", self.reduction)
        if not 0 <= self.margin < 10:
            raise field_error("margin", "a number of standard errors in [0, 10)", self.margin)
        for name in ("max_flops", "max_params", "max_latency_ms"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise field_error(name, "a positive number or none", getattr(self, name))
        check_seed("proposal_seed", self.proposal_seed)
        check_workers(self.workers)
        self.curve_fractions()
        super().validate()

    def curve_fractions(self) -> list[float]:
        """The fractions of `width_curve`, checked: distinct numbers between 0 and 1 (exclusive)."""
        try:
            fractions = [float(f) for f in self.width_curve.replace(" ", "").split(",") if f]
        except ValueError:
            fractions = []
            raise field_error("width_curve", "comma-separated fractions between 0 and 1", self.width_curve) from None
        if len(set(fractions)) != len(fractions) or not all(0 < f < 1 for f in fractions):
            raise field_error("width_curve", "distinct fractions between 0 and 1 (exclusive)", self.width_curve)
        return sorted(fractions)


# ---------------------------------------------------------------------------------------------
# The incumbent and the pool


def resnet9_arch(space: ArchSpace, base: TrainConfig) -> Arch | None:
    """The architecture of `space` that is the config's ResNet (cifar10-fast's ResNet-9 family), or None.

    Expressible when the space has three stages of a `conv3_pool` downsampling conv and a skip
    choice, the ResNet has no extra layers and at most one residual block per stage, and the
    space's widths are the config's (with width choices: the full width). A residual block is
    `conv2`, `conv3` and the skip after them (`conv4_input`); a stage without one is the bodiless
    `zero` skip. Every body conv the path does not compute takes its first candidate (it does not
    change the network).
    """
    names = [f"layer{i}" for i in (1, 2, 3)]
    depths = base.recipe_fields  # resnet9's res_*/extra_*
    if (base.recipe != "resnet9" or len(space.stages) != 3 or space.stem_op != "conv3" or space.stem_width != "prep"
            or space.head != HeadSpec() or depths.res_prep
            or any(getattr(depths, f"extra_{n}") for n in ("prep", *names))):
        return None
    arch: Arch = {}
    for stage, name in zip(space.stages, names):
        res = getattr(depths, f"res_{name}")
        skip = "conv4_input" if res == 1 else "zero" if res == 0 else None
        if (stage.width != name or "conv3_pool" not in stage.conv1 or skip not in stage.skip
                or (res == 1 and not (len(stage.body) >= 2 and "conv3" in stage.body[0] and "conv3" in stage.body[1]))):
            return None
        arch[f"{stage.name}.conv1"] = "conv3_pool"
        for i, candidates in enumerate(stage.body):
            arch[f"{stage.name}.conv{i + 2}"] = "conv3" if res == 1 and i < 2 else candidates[0]
        arch[f"{stage.name}.skip"] = skip
        if stage.widths:
            channels = {n: getattr(base, n) for n in NETWORK_STAGES}
            full = [w for w in stage.widths if width_channels(stage, w, channels) == getattr(base, name)]
            if not full:
                return None
            arch[f"{stage.name}.width"] = full[0]
    return space.check(arch)


@dataclass(frozen=True)
class Candidate:
    """One arm of the selection: a name, its architecture, where it came from and what it costs.

    An arm with no `arch` trains the base config's own network: the incumbent where the space
    cannot express it (`source` "baseline"), or the base network at other `widths` (`source`
    "width curve"). An arm with a `run` does not train: that finished run's held-out accuracies
    are reported epoch by epoch as if it trained now, and its work is not counted again.
    """

    name: str  # incumbent, proposal_0, proposal_1, ... (proposals in the order they were proposed)
    arch: Arch | None
    source: str  # incumbent (in the space), baseline (the base network itself), width curve, search or random
    flops: int
    params: int
    supernet_score: float | None = None  # the search's score (accuracy or -loss), for proposals from a search
    inherited_acc: float | None = None  # held-out accuracy with the supernet's weights (BN recalibrated), untrained
    widths: dict[str, int] | None = None  # the base network's widths for a width-curve arm
    run: str | None = None  # a finished run of exactly this training (the HPO best's), replayed instead of trained

    @property
    def fixed(self) -> bool:
        """Whether the arm trains the whole budget whatever its rungs show (the incumbent and the width curve)."""
        return self.source in FIXED_ARMS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def distinct_within(archs: Iterable[Arch], space: ArchSpace, count: int, within: Callable[[Arch], bool],
                    exclude: set[str]) -> list[Arch]:
    """The first `count` of `archs` that are distinct networks within the limits and not in `exclude`."""
    seen, out = set(exclude), []
    for arch in archs:
        key = network_key(space, arch)
        if key in seen or not within(arch):
            continue
        seen.add(key)
        out.append(arch)
        if len(out) == count:
            break
    return out


def random_archs(space: ArchSpace, draws: int, seed: int) -> Iterator[Arch]:
    """`draws` uniform random architectures of the space."""
    rng, choices = random.Random(seed), space.choices()
    for _ in range(draws):
        yield {key: rng.choice(candidates) for key, candidates in choices.items()}


def baseline_costs(base: TrainConfig, num_classes: int) -> tuple[int, int]:
    """(FLOPs, parameters) of the base config's own network."""
    model = recipe_for(base).build_model(num_classes)
    return count_flops(model), count_parameters(model)


def scaled_widths(base: TrainConfig, fraction: float) -> dict[str, int]:
    """The base network's widths times `fraction`, rounded (at least one channel)."""
    return {name: max(1, round(getattr(base, name) * fraction)) for name in NETWORK_STAGES}


def meets_limits(config: SelectConfig, flops: int, params: int) -> bool:
    """Whether a network of these costs is within the config's FLOPs and parameter limits."""
    return ((config.max_flops is None or flops <= config.max_flops)
            and (config.max_params is None or params <= config.max_params))


def curve_arms(config: SelectConfig, base: TrainConfig, num_classes: int) -> list[Candidate]:
    """The width curve's arms within the FLOPs and parameter limits (none under a latency limit: see `make_pool`)."""
    arms = []
    for fraction in config.curve_fractions() if config.max_latency_ms is None else []:
        widths = scaled_widths(base, fraction)
        flops, params = baseline_costs(dataclasses.replace(base, **widths), num_classes)
        if meets_limits(config, flops, params):
            arms.append(Candidate(f"resnet_{fraction:g}x", None, CURVE, flops, params, widths=widths))
    return arms


def check_incumbent_run(run_dir: Path, base: TrainConfig) -> str:
    """`run_dir` as a string if a run of exactly `base` (held-out split included) finished there, else ConfigError."""
    if finished_summary(run_dir, base) is None:
        raise ConfigError(f"{run_dir}: no finished training run (summary.json) to stand in for the incumbent")
    return str(run_dir)


def fixed_arms(config: SelectConfig, space: ArchSpace, costs: CostTable, base: TrainConfig, num_classes: int,
               within: Callable[[Arch], bool], inherited: Callable[[Arch], float | None],
               incumbent_run: Path | None = None) -> list[Candidate]:
    """The incumbent and the width curve, those within the limits (see `make_pool`)."""
    arms: list[Candidate] = []
    run = None if incumbent_run is None else check_incumbent_run(incumbent_run, base)
    if config.incumbent:
        arch = resnet9_arch(space, base)
        if arch is not None and within(arch):
            arms.append(Candidate(INCUMBENT, arch, INCUMBENT, costs.flops_of(arch), costs.params_of(arch),
                                  inherited_acc=inherited(arch), run=run))
        elif arch is None and meets_limits(config, *(own := baseline_costs(base, num_classes))):
            arms.append(Candidate(INCUMBENT, None, "baseline", *own, run=run))
    return arms + curve_arms(config, base, num_classes)


def pool_size(config: SelectConfig, base: TrainConfig, num_classes: int) -> int:
    """How many candidates a selection trains, known before the search is read: the proposals, and the fixed arms
    within the FLOPs and parameter limits (the incumbent at the base network's own cost)."""
    incumbent = config.incumbent and meets_limits(config, *baseline_costs(base, num_classes))
    return config.pool + incumbent + len(curve_arms(config, base, num_classes))


def make_pool(config: SelectConfig, space: ArchSpace, costs: CostTable, ranked: list[dict[str, Any]],
              base: TrainConfig, num_classes: int, within: Callable[[Arch], bool] | None = None,
              inherited: Callable[[Arch], float] | None = None, incumbent_run: Path | None = None) -> list[Candidate]:
    """The incumbent and the width curve (those within the limits), then the proposals: distinct networks within them.

    The incumbent is the base network's architecture in the space, or, where the space cannot
    express it, the base network itself as a fixed arm. The width curve is the base network at
    `width_curve` fractions of its widths, fixed arms outside the space (left out under a latency
    limit, which only the space's latency table can check). `within` tells whether an architecture
    meets the limits (default: the config's FLOPs and parameter limits by `costs`); `inherited`
    gives an architecture's accuracy with the supernet's weights; `incumbent_run`, a finished run of
    the base config (on the same held-out split), stands in for the incumbent's training. A
    ConfigError when nothing in the space meets the limits (naming the smallest cost there is), or
    when fewer proposals exist than `pool` asks for.
    """
    within = within or (lambda arch: meets_limits(config, costs.flops_of(arch), costs.params_of(arch)))
    smallest = costs.extreme(False, space)
    if not within(smallest):
        raise ConfigError(f"no architecture within max_flops {config.max_flops} / max_params {config.max_params} / "
                          f"max_latency_ms {config.max_latency_ms}: the smallest has {costs.flops_of(smallest):,} "
                          f"FLOPs and {costs.params_of(smallest):,} parameters")
    score = inherited or (lambda arch: None)
    pool = fixed_arms(config, space, costs, base, num_classes, within, score, incumbent_run)
    exclude = {network_key(space, c.arch) for c in pool if c.arch is not None}
    if config.proposals == "search":
        archs = distinct_within((space.check(r["arch"]) for r in ranked), space, config.pool, within, exclude)
        scores: dict[str, float | None] = {}
        for r in ranked:  # a network's best-ranked record holds its score
            scores.setdefault(network_key(space, space.check(r["arch"])), r.get("score"))
    else:
        draws = random_archs(space, max(10_000, 200 * config.pool), config.proposal_seed)
        archs = distinct_within(draws, space, config.pool, within, exclude)
        scores = {}
    if len(archs) < config.pool:
        where = "the search's results" if config.proposals == "search" else "the space"
        raise ConfigError(f"pool: {config.pool} distinct networks within the limits were asked for, {where} "
                          f"{'hold' if config.proposals == 'search' else 'holds'} only {len(archs)} besides the "
                          f"incumbent; lower --pool")
    for i, arch in enumerate(archs):
        pool.append(Candidate(f"proposal_{i}", arch, config.proposals, costs.flops_of(arch), costs.params_of(arch),
                              scores.get(network_key(space, arch)), score(arch)))
    return pool


# ---------------------------------------------------------------------------------------------
# The study


def rungs(config: SelectConfig, epochs: int) -> list[int]:
    """The epochs at which candidates are compared: min_epochs x reduction^k below `epochs`, then `epochs`."""
    out, rung = [], config.min_epochs
    while rung < epochs:
        out.append(rung)
        rung *= config.reduction
    return [*out, epochs]


def open_select_study(config: SelectConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create or load the study: enqueued candidates, successive halving on the held-out accuracy per epoch."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=config.min_epochs, reduction_factor=config.reduction,
                                                    min_early_stopping_rate=0)
    return optuna.create_study(storage=storage, study_name=config.study, sampler=optuna.samplers.RandomSampler(0),
                               pruner=pruner, direction="maximize", load_if_exists=True)


class CandidateRunner:
    """The objective: one trial = one candidate trained standalone in OUT/trials/NAME, pruned at a rung if behind."""

    def __init__(self, study: optuna.Study, pool: list[Candidate], base: TrainConfig, out_dir: Path,
                 data: CifarData | None = None):
        self.study, self.base, self.out_dir, self.data = study, base, out_dir, data
        self.pool = {c.name: c for c in pool}

    def __call__(self, trial: optuna.Trial) -> FrozenTrial:
        name = trial.suggest_categorical("candidate", list(self.pool))
        candidate = self.pool[name]
        run_dir = self.out_dir / TRIALS_DIR / name
        trial.set_user_attr("run_dir", str(run_dir.relative_to(self.out_dir)))
        config = dataclasses.replace(self.base, **(candidate.widths or {})) if candidate.arch is None else (
            dataclasses.replace(self.base, arch=str((self.out_dir / ARCHS_DIR / f"{name}.json").resolve())))
        accuracies: list[float] = []

        def report(m: EpochMetrics) -> None:
            accuracies.append(m.valid_acc)
            trial.set_user_attr("accuracies", list(accuracies))
            trial.set_user_attr("train_time", m.train_time)
            if candidate.source == CURVE:  # a reference, not a competitor: it takes no place at the rungs
                return
            trial.report(m.valid_acc, m.epoch)
            behind = trial.should_prune()  # asked of the incumbent too: it records the arm's value at each rung
            if behind and not candidate.fixed and m.epoch < config.epochs:  # a full run is complete
                raise optuna.TrialPruned(f"pruned after epoch {m.epoch}")

        try:
            if candidate.run is not None:  # trained already (a fixed arm: never pruned)
                trial.set_user_attr("run_dir", candidate.run)
                for m in read_logs(Path(candidate.run) / "logs.tsv"):
                    report(m)
                summary = finished_summary(Path(candidate.run), self.base)
            else:
                if self.data is None or self.data.name != config.dataset:
                    self.data = load_dataset(config.dataset, config.data_dir)
                with locked(run_dir, "train"):
                    clear(run_dir)  # a retried candidate starts again
                    summary = train(config, run_dir, callbacks=[report], data=self.data).summary
        except optuna.TrialPruned:
            trial.set_user_attr("epochs", len(accuracies))
            return self.study.tell(trial, state=TrialState.PRUNED)
        except Exception as e:  # a failed candidate is recorded and the study goes on
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}".splitlines()[0])
            return self.study.tell(trial, state=TrialState.FAIL)
        trial.set_user_attr("epochs", len(accuracies))
        trial.set_user_attr("train_images", summary["dataset"]["train_images"])
        trial.set_user_attr("test_acc", summary["test_acc"])
        return self.study.tell(trial, summary["final_valid_acc"])


def run_worker(config: SelectConfig, pool: list[Candidate], base: TrainConfig, out_dir: Path, threads: int = 0,
               on_trial: OnTrial | None = None, worker: int = 0) -> None:
    """Take candidates until every one has finished (complete, pruned or failed)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_select_study(config, open_storage(config, out_dir))
    run_trials(study, config, out_dir, len(pool), CandidateRunner(study, pool, base, out_dir), on_trial=on_trial)


def requeue_failed(study: optuna.Study, pool: list[Candidate]) -> None:
    """Enqueue again each candidate whose last trial failed (interrupted, or an error), once per resume."""
    trials = current_trials(study)
    retried = retried_numbers(trials)
    latest = {t.params["candidate"]: t for t in sorted(trials, key=lambda t: t.number) if "candidate" in t.params}
    for c in pool:
        t = latest.get(c.name)
        if t is not None and t.state == TrialState.FAIL and t.number not in retried:
            study.enqueue_trial({"candidate": c.name}, user_attrs={"source": c.source, "retry_of": t.number},
                                skip_if_exists=False)


def setup_values(config: SelectConfig, pool: list[Candidate], base: TrainConfig) -> dict[str, Any]:
    """What the recorded results mean: the candidates, their training and the halving schedule."""
    return {"pool": [(c.name, c.arch, c.widths) for c in pool], "base": result_values(base),
            "min_epochs": config.min_epochs,
            "reduction": config.reduction}


# ---------------------------------------------------------------------------------------------
# Running and reading a selection


@dataclass
class SelectionResult:
    """The answer and every candidate's record (`select.json`)."""

    answer: str  # the chosen candidate's name
    rows: list[dict[str, Any]]  # per candidate: arch, source, costs, rung accuracies, state, final held-out, test
    rungs: list[int]
    image_epochs: int  # training work of the whole selection: training images x epochs, summed over candidates
    train_seconds: float
    sentence: str  # what the selection bought, in one sentence

    @property
    def chosen(self) -> dict[str, Any]:
        return next(r for r in self.rows if r["name"] == self.answer)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_inputs(config: SelectConfig, base: TrainConfig) -> None:
    """ConfigError for a bad config, training without held-out images, or a first rung past the budget."""
    config.validate()
    base.validate()
    if not base.holdout:
        raise ConfigError("holdout: selection chooses on held-out training images; expected holdout > 0, got 0")
    if base.recipe != TrainConfig.recipe:
        raise ConfigError(f"recipe: the candidates are networks of the search space, which the {TrainConfig.recipe} "
                          f"recipe builds; expected {TrainConfig.recipe}, got {base.recipe}")
    if config.min_epochs > base.epochs:
        raise ConfigError(f"min_epochs: the first rung must fit the training budget; expected at most "
                          f"epochs = {base.epochs}, got {config.min_epochs}")


def run_selection(config: SelectConfig, space: ArchSpace, costs: CostTable, ranked: list[dict[str, Any]],
                  base: TrainConfig, out_dir: str | Path, data: CifarData | None = None,
                  on_trial: OnTrial | None = None, within: Callable[[Arch], bool] | None = None,
                  inherited: Callable[[Arch], float] | None = None,
                  incumbent_run: Path | None = None) -> SelectionResult:
    """Run (or resume) the selection in `out_dir`; write select.json and answer.json; return the result.

    `ranked` is the search's records best first (`effcifar.nas.search.top_records`), `base` the
    candidates' training (held-out validation required: `base.holdout` > 0), `costs` the space's
    cost table at the base's widths; `within`, `inherited` and `incumbent_run` as in `make_pool`.
    Nothing is written before every check has passed.
    """
    check_inputs(config, base)
    out_dir = Path(out_dir)
    data = data or load_dataset(base.dataset, base.data_dir)
    pool = make_pool(config, space, costs, ranked, base, data.num_classes, within, inherited, incumbent_run)
    with locked(out_dir, "select"):
        storage = open_storage(config, out_dir)
        config = dataclasses.replace(config, study=study_name(storage, config, out_dir,
                                                              recorded_study(out_dir / CONFIG_FILE, SelectConfig)))
        study = open_select_study(config, storage)
        check_setup(study, SETUP_ATTR, setup_values(config, pool, base), str(out_dir),
                    "pool, training config or halving schedule")
        for c in pool:
            if c.arch is not None:
                atomic_write(out_dir / ARCHS_DIR / f"{c.name}.json",
                             json.dumps({"arch": c.arch, "space": space.to_dict()}, indent=2) + "\n")
        save_config(config.without_password(), out_dir / CONFIG_FILE)
        if not current_trials(study):  # enqueued once, in pool order: the incumbent first
            for c in pool:
                study.enqueue_trial({"candidate": c.name}, user_attrs={"source": c.source})
        else:  # resumed: a candidate stopped midway (Ctrl-C, SIGTERM) or failed trains again
            requeue_failed(study, pool)
        if config.workers == 1:
            run_trials(study, config, out_dir, len(pool), CandidateRunner(study, pool, base, out_dir, data),
                       on_trial=on_trial)
        else:
            threads = max(1, (os.cpu_count() or 1) // config.workers)
            start_workers(study, config.workers, run_worker, (config, pool, base, out_dir, threads), on_trial,
                          config.storage)
        result = summarise(current_trials(study), pool, rungs(config, base.epochs), config.margin,
                           base.holdout)
        atomic_write(out_dir / RESULT_FILE, json.dumps(result.to_dict(), indent=2) + "\n")
        failed = [r for r in result.rows if r["state"] == TrialState.FAIL.name]
        if failed:  # the answer would be unchecked against them: no answer.json, and the command fails
            (out_dir / ANSWER_FILE).unlink(missing_ok=True)
            raise ConfigError(f"{out_dir}: {len(failed)} of {len(result.rows)} candidates failed ({failed[0]['name']}: "
                              f"{failed[0]['fail_reason']}); run the same command again to retry them")
        chosen = result.chosen
        atomic_write(out_dir / ANSWER_FILE, json.dumps({
            "arch": chosen["arch"], "space": space.to_dict(), "name": chosen["name"], "source": chosen["source"],
            "accuracy": chosen["holdout_acc"], "flops": chosen["flops"], "params": chosen["params"],
            "widths": chosen["widths"] or base.widths(),  # the stage widths it was trained at
            "config": os.path.relpath(Path(chosen["run"] or out_dir / TRIALS_DIR / chosen["name"]) / "config.yaml",
                                      out_dir)},  # relative to answer.json's folder, which may move
            indent=2) + "\n")
    return result


def select_from_search(config: SelectConfig, search_dir: str | Path, out_dir: str | Path, base: TrainConfig,
                       on_trial: OnTrial | None = None, search_storage: str | None = None,
                       incumbent_run: Path | None = None) -> SelectionResult:
    """`run_selection` over a finished search run: its supernet's final space and widths, its ranked results, under
    the search's cost limits unless `config` sets any.

    Each candidate also gets its accuracy with the supernet's weights (BN recalibrated, as the
    search judged it), shown beside its accuracy from scratch. A latency limit uses the search's
    latency table (measured here when the search made none). A search study in PostgreSQL is
    saved without its password: give `search_storage` again, or let libpq find the password
    (PGPASSWORD, ~/.pgpass).
    """
    from effcifar.config import build_config
    from effcifar.nas.retrain import search_supernet_dir
    from effcifar.nas.search import CONFIG_FILE as SEARCH_CONFIG, CandidateEvaluator, SearchConfig, top_records
    from effcifar.studies import load_study

    search_dir = Path(search_dir)
    check_inputs(config, base)
    if not (search_dir / SEARCH_CONFIG).is_file():
        raise ConfigError(f"{search_dir}: not a search run (no {SEARCH_CONFIG}; run `effcifar search` first)")
    search = build_config(SearchConfig, search_dir / SEARCH_CONFIG)
    if search_storage is not None:
        search = dataclasses.replace(search, storage=search_storage)
    limits = ("max_flops", "max_params", "max_latency_ms")
    if all(getattr(config, name) is None for name in limits):  # none given: the search's, not none at all
        config = dataclasses.replace(config, **{name: getattr(search, name) for name in limits})
    study = load_study(search, search_dir)
    judged = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    if judged < search.trials:  # its ranking would be a part of the one asked for
        raise ConfigError(f"{search_dir}: the search has not finished ({judged} of {search.trials} trials): run it "
                          f"to the end first")
    judge = CandidateEvaluator.from_run(search_supernet_dir(search_dir), dataclasses.replace(
        search, max_flops=None, max_params=None, max_latency_ms=config.max_latency_ms), search_dir)
    judge.sync(study.get_trials(deepcopy=False))
    if judge.latency is not None and not judge.is_feasible(fastest := judge.latency.fastest(judge.space)):
        raise ConfigError(f"max_latency_ms: no architecture within {config.max_latency_ms} ms; the fastest takes "
                          f"{judge.latency.latency_of(fastest):.3f} ms")
    data = load_dataset(base.dataset, base.data_dir)
    costs = CostTable.build(judge.space, {w: getattr(base, w) for w in judge.costs.channels}, data.num_classes)

    def within(arch: Arch) -> bool:  # FLOPs and parameters at the trained widths, latency by the search's table
        return meets_limits(config, costs.flops_of(arch), costs.params_of(arch)) and judge.is_feasible(arch)

    ranked = top_records(study, len(study.trials))
    return run_selection(config, judge.space, costs, ranked, base, out_dir, data, on_trial, within,
                         lambda arch: judge.evaluate(arch)[0].accuracy, incumbent_run)


def limit_dir(out_dir: Path, max_flops: float) -> Path:
    """Where the selection under one FLOPs limit of a front lives: OUT/flops_<M>M."""
    return out_dir / f"flops_{max_flops / 1e6:g}M"


def limit_selection(config: SelectConfig, out_dir: Path, limit: float) -> tuple[Path, SelectConfig]:
    """The directory and config of a front's selection under one FLOPs limit (in a shared database, a study named
    after the front's and the limit's)."""
    directory = limit_dir(out_dir, limit)
    study = None if config.storage is None else f"{config.study or out_dir.name}-{directory.name}"
    return directory, dataclasses.replace(config, max_flops=limit, study=study)


def front_limits(value: str | Iterable[float]) -> list[float]:
    """FLOPs limits from text ("12e6,30e6") or numbers, smallest first; a ValueError saying what was expected for
    anything but distinct positive numbers (what `select --front` and the pipeline's `select.front` take)."""
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
        raise ValueError(FRONT_EXPECTED)
    try:
        limits = sorted(float(v) for v in items if v != "")
    except ValueError:
        raise ValueError(FRONT_EXPECTED) from None
    if not limits or len(set(limits)) != len(limits) or not all(math.isfinite(v) and v > 0 for v in limits):
        raise ValueError(FRONT_EXPECTED)
    return limits


def smallest_flops(space: ArchSpace, channels: Mapping[str, int], num_classes: int) -> int:
    """The FLOPs of the space's smallest network at these widths: a FLOPs limit below it leaves nothing to select."""
    costs = CostTable.build(space, channels, num_classes)
    return costs.flops_of(costs.extreme(False))


def select_front(config: SelectConfig, search_dir: str | Path, out_dir: str | Path, base: TrainConfig,
                 limits: Iterable[float], on_trial: OnTrial | None = None, search_storage: str | None = None,
                 on_limit: Callable[[float], None] | None = None,
                 incumbent_run: Path | None = None) -> list[SelectionResult]:
    """The verified front: one selection per FLOPs limit (each in `limit_dir`, a study of its own), one answer each.

    The limits run from the smallest up, so a limit that nothing meets fails before anything
    trains. Each selection takes the search's best networks under its own limit and the incumbent
    and width curve within it; a network under several limits trains in each. A limit's selection
    that finished trains nothing again, one cut short resumes. `on_limit` hears of each limit as its
    selection starts; `incumbent_run` as in `make_pool`. `front.json` lists the answers (limit,
    candidate, held-out and test accuracy, FLOPs, parameters).
    """
    limits = list(limits)
    try:
        limits = front_limits(limits)
    except ValueError as e:
        raise ConfigError(f"front: expected {e}; got {', '.join(map(str, limits)) or 'none'}") from None
    results = []
    for limit in limits:
        directory, limited = limit_selection(config, Path(out_dir), limit)
        if on_limit is not None:
            on_limit(limit)
        results.append(select_from_search(limited, search_dir, directory, base, on_trial, search_storage,
                                          incumbent_run))
    front = [{"max_flops": limit, **{k: r.chosen[k] for k in ("name", "source", "holdout_acc", "test_acc", "flops",
                                                              "params", "widths")}}
             for limit, r in zip(limits, results)]
    atomic_write(Path(out_dir) / FRONT_FILE, json.dumps(front, indent=2) + "\n")
    return results


def summarise(trials: list[FrozenTrial], pool: list[Candidate], rung_epochs: list[int], margin: float = 0.0,
              holdout: int = 0) -> SelectionResult:
    """Every candidate's record and the answer (`choose`) among those that finished the last rung."""
    latest: dict[str, FrozenTrial] = {}
    for t in sorted(trials, key=lambda t: t.number):  # a retried candidate: its last trial counts
        if "candidate" in t.params and (t.state in FINISHED or t.state == TrialState.FAIL):
            latest[t.params["candidate"]] = t
    rows = []
    for c in pool:
        t = latest.get(c.name)
        attrs = t.user_attrs if t is not None else {}
        complete = t is not None and t.state == TrialState.COMPLETE
        rows.append({**c.to_dict(), "state": t.state.name if t is not None else "NOT RUN",
                     "epochs": attrs.get("epochs", 0), "accuracies": attrs.get("accuracies", []),
                     "holdout_acc": t.value if complete else None, "test_acc": attrs.get("test_acc"),
                     "train_time": attrs.get("train_time"), "fail_reason": attrs.get("fail_reason"),
                     "image_epochs": attrs.get("epochs", 0) * attrs.get("train_images", 0)})
    finished = [r for r in rows if r["holdout_acc"] is not None]
    if not finished:
        reasons = sorted({r["fail_reason"] for r in rows if r["fail_reason"]})
        raise ConfigError("no candidate finished the last rung" + (f" ({reasons[0]})" if reasons else ""))
    best = choose(rows, margin, holdout)
    images = next((t.user_attrs["train_images"] for t in trials if "train_images" in t.user_attrs), 0)
    curve = sorted((r["flops"], r["holdout_acc"]) for r in finished if r["source"] in FIXED_ARMS)
    for r in rows:  # a pruned run stopped before summary.json: its images are those of any finished one
        r["image_epochs"] = 0 if r["run"] else r["epochs"] * images  # a replayed run's work was counted where it ran
        r["curve_acc"] = curve_accuracy(curve, r["flops"]) if r["source"] not in FIXED_ARMS else None
    return SelectionResult(best["name"], rows, rung_epochs, sum(r["image_epochs"] for r in rows),
                           sum(r["train_time"] or 0.0 for r in rows if not r["run"]), verdict(best, rows))


def choose(rows: list[dict[str, Any]], margin: float = 0.0, holdout: int = 0) -> dict[str, Any]:
    """The answer among the rows that finished the last rung: the best held-out accuracy (fewer FLOPs on a tie).

    With `margin` > 0, champion and challengers in pool order (the incumbent and fixed arms, then
    the search's ranking): the first finished row is the answer until a later one leads it by more
    than `margin` standard errors of the difference (binomial, over `holdout` images), which then
    is the answer in its place. A later candidate overturns an earlier one only beyond sampling noise.
    """
    finished = [r for r in rows if r["holdout_acc"] is not None]
    if not margin or not holdout:
        return max(finished, key=lambda r: (r["holdout_acc"], -r["flops"], -r["params"]))
    answer = finished[0]
    for r in finished[1:]:
        a, b = r["holdout_acc"], answer["holdout_acc"]
        if a - b > margin * math.sqrt((a * (1 - a) + b * (1 - b)) / holdout):
            answer = r
    return answer


def above_curve(row: Mapping[str, Any]) -> float | None:
    """How far a candidate's held-out accuracy lies above the width curve at its FLOPs (None: not measured)."""
    if row["holdout_acc"] is None or row.get("curve_acc") is None:
        return None
    return row["holdout_acc"] - row["curve_acc"]


def curve_accuracy(curve: list[tuple[int, float]], flops: int) -> float | None:
    """The width-scaled baseline's held-out accuracy at `flops`: linear in log FLOPs between its finished points,
    its widest point's beyond them, None below its narrowest (nothing to compare with)."""
    if not curve or flops < curve[0][0]:
        return None
    for (f0, a0), (f1, a1) in zip(curve, curve[1:]):
        if f0 <= flops <= f1:
            return a0 if f1 == f0 else a0 + (a1 - a0) * math.log(flops / f0) / math.log(f1 / f0)
    return curve[-1][1]


def verdict(best: Mapping[str, Any], rows: list[Mapping[str, Any]]) -> str:
    """One sentence: which candidate won on held-out images, and by how much over the incumbent (one seed)."""
    incumbent = next((r for r in rows if r["name"] == INCUMBENT), None)
    figure = lambda r: f"{r['holdout_acc']:.2%} held out at {r['flops'] / 1e6:,.1f} MFLOPs"  # noqa: E731
    finished = sum(r["holdout_acc"] is not None for r in rows)
    tail = f" ({finished} of {len(rows)} candidates reached the last rung; one training seed each)"
    if incumbent is None:
        return f"selected {best['name']}: {figure(best)}; no incumbent in the pool" + tail
    if best["name"] == INCUMBENT:
        return f"no proposal beat the incumbent ResNet-9 ({figure(best)}): the baseline stands" + tail
    if incumbent["holdout_acc"] is None:
        return f"selected {best['name']} ({figure(best)}); the incumbent ResNet-9 did not finish" + tail
    has_curve = any(r["source"] == CURVE and r["holdout_acc"] is not None for r in rows)
    curve = "" if above_curve(best) is None or not has_curve else (
        f", {above_curve(best) * 100:+.2f} above the width-scaled ResNet-9 at its FLOPs")
    return (f"selected {best['name']} ({figure(best)}) over the incumbent ResNet-9 ({figure(incumbent)}): "
            f"{(best['holdout_acc'] - incumbent['holdout_acc']) * 100:+.2f} points held out{curve}" + tail)


def read_front(out_dir: str | Path) -> list[tuple[float | None, Path, SelectionResult]]:
    """The finished selections of a directory, smallest FLOPs limit first, each as (its limit, its directory, its
    result): a front's (its `limit_dir`s, with front.json or not yet) or a single selection's (limit None: none)."""
    from effcifar.config import build_config

    out_dir = Path(out_dir)
    found = [out_dir] if (out_dir / RESULT_FILE).is_file() else [
        d for d in out_dir.glob("flops_*M") if (d / RESULT_FILE).is_file()]
    limits = [build_config(SelectConfig, d / CONFIG_FILE).max_flops for d in found]
    return sorted(((limit, d, read_selection(d)) for limit, d in zip(limits, found)),
                  key=lambda selection: -1.0 if selection[0] is None else selection[0])


def read_selection(out_dir: str | Path) -> SelectionResult:
    """The select.json of a finished selection."""
    from effcifar.config import read_json

    path = Path(out_dir) / RESULT_FILE
    data = read_json(path, "selection result")
    try:
        return SelectionResult(**data)
    except TypeError:
        expected = ", ".join(f.name for f in dataclasses.fields(SelectionResult))
        raise ConfigError(f"{path}: not a selection result (expected {expected})") from None
