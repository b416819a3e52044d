"""Single-path one-shot (SPOS) supernet training with exact resume, search-space shrinking and DDP.

Each step samples one path uniformly from the current space (optionally only paths within a
FLOPs range, resampling as NNI's SPOS mutator did) and trains it with the core trainer's step:
device-resident batches, label smoothing, SGD Nesterov, autocast. After every epoch a fixed
panel of reference subnets (largest, smallest, seeded random ones) is evaluated on held-out
training images after BN recalibration, so `logs.tsv` shows whether the supernet learns.

Checkpoints hold everything the rest of the run depends on (weights, optimiser, schedule
position, every RNG state, the epoch's data order, the shrunk space), so a run resumed from
one ends bitwise-identical to an uninterrupted run on CPU. They are written atomically with a
digest, after every epoch and when the process gets SIGTERM/SIGINT.

Under `torchrun` each rank sees the same global batch and path, trains on its slice, and batch
norm uses statistics of the whole global batch, so N processes compute the same update as one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from effcifar.allocator import allocator_in_effect
from effcifar.atomic import atomic_write
from effcifar.config import (
    build_config, execution, field_error, fingerprint, read_config_file, result_values, save_config, setting,
)
from effcifar.data import CifarData, DeviceLoader, load_dataset
from effcifar.errors import ConfigError, EffcifarError, TrainingDiverged
from effcifar.models import NETWORK_STAGES as STAGES
from effcifar.nas.space import (
    Arch, ArchSpace, CostTable, FewShotSupernet, LayerChoice, SlicedBatchNorm2d, Supernet, extreme_arch, ladder_arch,
    skip_depth,
)
from effcifar.rundir import locked
from effcifar.device import device_name, resolve_device, resolve_precision
from effcifar.train import (
    AugmentFields, DataFields, ExecutionFields, OptimiserFields, TrainConfig, TrainStep, WidthFields, check_memory,
    device_loaders, library_versions, seed_everything, write_tsv,
)

SCHEDULES = ("linear", "cosine")
SAMPLINGS = ("uniform", "fair", "sandwich", "ladder")  # paths per step: one; one per candidate (FairNAS);
# largest+smallest+random (BigNAS); every candidate's all-same rung+random (LadderSampler)
BN_EVALS = ("recalibrate", "batch")  # BN statistics when a subnet is judged
# Fields that the hyper-parameter search decides; `hparams: best.json` supplies them.
HPARAM_FIELDS = (
    "dataset", "batch_size", "crop_pad", "flip", "cutout", "peak_lr", "base_wd", "momentum", "nesterov",
    "label_smoothing", "logits_weight", *STAGES,
)
CHECKPOINT_MAGIC = b"EFFCIFAR-CKPT-1\n"
MAX_SAMPLING_TRIES = 10_000
EXTREME_DRAWS = 1_000  # feasible draws among which a sampler takes the largest/smallest path under FLOPs limits
FAIR_DRAWS = 100  # fair groups drawn per step under FLOPs limits before the step takes uniform paths within them


class TrainingInterrupted(EffcifarError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and `--resume` continues the run."""


@dataclass
class SupernetConfig(ExecutionFields, WidthFields, OptimiserFields, AugmentFields, DataFields):
    """Everything a supernet run depends on; the defaults are the seed's SPOS setup.

    The learning rate is `lr_factor` x `peak_lr` (the seed trained the supernet at 0.3x the HPO
    learning rate), decayed per step to 0 over `epochs` (linear or cosine). Data, augmentation,
    optimiser, widths and execution are the core trainer's parts, with its checks.
    """

    holdout: int = setting(5000, "held-out training images for the panel and shrinking (never the test set)")
    space: str = setting("seed", "a built-in space (seed, seed-widths, nas-bench-macro) or a YAML/JSON space file")
    hparams: str | None = execution(None, "best.json of an HPO run: widths, LR, weight decay, augmentation")
    epochs: int = setting(30, "epochs of supernet training")
    lr_factor: float = setting(0.3, "the learning rate is this times peak_lr")
    schedule: str = setting("linear", "how the learning rate decays to 0 over the epochs", SCHEDULES)
    warmup_epochs: float = setting(0.0, "the LR rises linearly from 0 over these epochs, then decays")
    # path sampling and evaluation
    flops_min: float | None = setting(None, "sample only paths with at least this many forward FLOPs per image")
    flops_max: float | None = setting(None, "sample only paths with at most this many forward FLOPs per image")
    panel_random: int = setting(5, "seeded random subnets in the per-epoch panel (besides largest and smallest)")
    bn_batches: int = setting(10, "training batches used to recalibrate BN before each evaluation")
    shrink_at: str = setting("", "comma-separated epochs after which each key loses its worst candidate")
    shrink_samples: int = setting(10, "each candidate is judged on at least this many subnets")
    sampling: str = setting("sandwich", "paths per step: uniform (SPOS, one), fair (FairNAS, one per candidate), "
                                        "sandwich (BigNAS: largest, smallest, random), ladder (rungs, then random)",
                            SAMPLINGS)
    sandwich_paths: int = setting(4, "paths per step, sandwich (largest, smallest, the rest random) and ladder "
                                     "(rungs first)")
    distill: bool = setting(False, "in-place distillation: each step's other paths learn the largest path's soft "
                                   "labels")
    bn_eval: str = setting("recalibrate", "a judged subnet's BN: running statistics recalibrated, or each batch's own",
                           BN_EVALS)
    canonical_paths: bool = setting(False, "run each network as one path: a sequential stage's identities last (see "
                                           "canonical_path)")
    few_shot_key: str = setting("", "after `epochs`, split the supernet on this choice key: one sub-supernet per "
                                    "candidate")
    few_shot_epochs: int = setting(0, "epochs each sub-supernet trains, warm-started from the one-shot weights")
    depth_from: int = setting(0, "progressive depth (OFA): before this epoch every stage runs its deepest skip")
    keep_checkpoints: int = execution(3, "checkpoints kept in the run directory (the newest)")

    def train_config(self) -> TrainConfig:
        """The core-trainer config of the shared fields (used for its checks and its step)."""
        shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(self)}
        return TrainConfig(**{name: getattr(self, name) for name in shared})

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for the first bad value."""
        self.train_config().validate()
        for name in ("epochs", "bn_batches", "shrink_samples", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise field_error(name, "a positive integer", getattr(self, name))
        if self.holdout <= 0:
            raise field_error("holdout", "a positive number of held-out training images", self.holdout)
        if self.panel_random < 0:
            raise field_error("panel_random", "an integer >= 0", self.panel_random)
        if not 0 <= self.warmup_epochs < self.epochs:
            raise field_error("warmup_epochs", f"a number in [0, epochs={self.epochs})", self.warmup_epochs)
        if not self.lr_factor > 0:
            raise field_error("lr_factor", "a number > 0", self.lr_factor)
        if self.schedule not in SCHEDULES:
            raise field_error("schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        if self.sampling not in SAMPLINGS:
            raise field_error("sampling", f"one of {', '.join(SAMPLINGS)}", self.sampling)
        if self.sandwich_paths < 2:
            raise field_error("sandwich_paths", "an integer >= 2 (the largest and the smallest path)",
                              self.sandwich_paths)
        if self.sampling == "ladder":
            rungs = ArchSpace.load(self.space).most_candidates()
            if self.sandwich_paths < rungs:
                raise field_error("sandwich_paths", f"an integer >= {rungs} (one rung per candidate) with sampling "
                                  f"ladder", self.sandwich_paths)
        if self.bn_eval not in BN_EVALS:
            raise field_error("bn_eval", f"one of {', '.join(BN_EVALS)}", self.bn_eval)
        if self.few_shot_key:
            keys = list(ArchSpace.load(self.space).choices())
            if self.few_shot_key not in keys:
                raise field_error("few_shot_key", f"a choice key of the space ({', '.join(keys)}) or empty",
                                  self.few_shot_key)
            if self.few_shot_epochs < 1:
                raise field_error("few_shot_epochs", "a positive integer with few_shot_key", self.few_shot_epochs)
        elif self.few_shot_epochs:
            raise field_error("few_shot_epochs", "0 without few_shot_key", self.few_shot_epochs)
        if self.depth_from and not 0 < self.depth_from < self.epochs:
            raise field_error("depth_from", f"an epoch in [1, epochs={self.epochs}) or 0 (off)", self.depth_from)
        if self.depth_from and not any(key.endswith(".skip") for key in ArchSpace.load(self.space).choices()):
            raise field_error("depth_from", "0 for a space without skip choices (no depth to grow into)",
                              self.depth_from)
        if self.canonical_paths and self.sampling == "fair":
            raise field_error("canonical_paths", "false with fair sampling (moving identities would undo the fairness)",
                              self.canonical_paths)
        if self.canonical_paths and self.few_shot_key and not self.few_shot_key.endswith(".conv1"):
            raise field_error("few_shot_key", "a stage's conv1 key with canonical_paths (body ops move between keys)",
                              self.few_shot_key)
        for name in ("flops_min", "flops_max"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise field_error(name, "a positive number of FLOPs or none", getattr(self, name))
        if self.flops_min is not None and self.flops_max is not None and self.flops_min > self.flops_max:
            raise field_error("flops_max", f"a number >= flops_min ({self.flops_min:g})", self.flops_max)
        self.shrink_epochs()

    def shrink_epochs(self) -> list[int]:
        """The epochs of `shrink_at`, checked."""
        try:
            epochs = [int(e) for e in self.shrink_at.replace(" ", "").split(",") if e]
        except ValueError:
            raise field_error("shrink_at", "comma-separated epoch numbers, e.g. 10,20", self.shrink_at) from None
        if any(not 1 <= e < self.epochs for e in epochs) or len(set(epochs)) != len(epochs):
            raise field_error("shrink_at", f"distinct epochs in [1, {self.epochs - 1}]", self.shrink_at)
        return sorted(epochs)

    def channels(self) -> dict[str, int]:
        """Width of each named stage (what a space's `width: layer1` refers to)."""
        return {s: getattr(self, s) for s in STAGES}

    def lr_at(self, epoch: float) -> float:
        """Learning rate at a fractional epoch: warm-up to lr_factor x peak_lr, then decayed to 0 at `epochs`."""
        top = self.lr_factor * self.peak_lr
        if epoch < self.warmup_epochs:
            return top * epoch / self.warmup_epochs
        t = min(max((epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs), 0.0), 1.0)
        return top * (1 - t) if self.schedule == "linear" else top * 0.5 * (1 + math.cos(math.pi * t))

    def fingerprint(self) -> str:
        """What a resumed run must match: the fields that change results, and the space's content."""
        return fingerprint({**result_values(self), "space": ArchSpace.load(self.space).to_dict()})


def load_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                overrides_from_text: bool = False, override_source: str = "command line") -> SupernetConfig:
    """Defaults < hparams (best.json) < file < overrides."""
    hparams = (overrides or {}).get("hparams")
    if hparams is None and file is not None:
        hparams = read_config_file(file).get("hparams")
    base = None
    if hparams not in (None, "", "none", "null"):
        best = read_config_file(hparams)
        base = (str(hparams), {k: best[k] for k in HPARAM_FIELDS if k in best})
    return build_config(SupernetConfig, file, overrides, overrides_from_text, override_source, base=base)


# ---------------------------------------------------------------------------------------------
# Path sampling, BN recalibration and subnet evaluation


class PathSampler:
    """The paths of each training step. Uniform (SPOS): one path, resampled until its FLOPs are within limits."""

    def __init__(self, costs: CostTable, seed: int, flops_min: float | None = None, flops_max: float | None = None):
        self.costs, self.flops_min, self.flops_max, self.seed = costs, flops_min, flops_max, seed
        self.rng = random.Random(seed)
        self.extremes: dict[tuple[bool, str], Arch] = {}  # (largest, space) -> path: computed once per space

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
        return (self.flops_min is None or flops >= self.flops_min) and (self.flops_max is None or flops <= self.flops_max)

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


class SandwichSampler(PathSampler):
    """BigNAS's sandwich rule: the largest and the smallest path (by FLOPs, within the limits) and `paths - 2`
    uniform random ones."""

    def __init__(self, costs: CostTable, seed: int, paths: int, flops_min: float | None = None,
                 flops_max: float | None = None):
        super().__init__(costs, seed, flops_min, flops_max)
        self.paths = paths

    def step_paths(self, space: ArchSpace) -> list[Arch]:
        return [self.extreme(True, space), self.extreme(False, space)] + [
            self.sample(space) for _ in range(self.paths - 2)]


class LadderSampler(SandwichSampler):
    """The sandwich rule with every rung between the extremes: K all-same paths (K: the most candidates of a
    key), path j taking each key's j-th candidate by FLOPs (`ladder_arch`), then `paths - K` uniform random ones.

    Under the sandwich rule only the two extreme candidates have a path of their own each step; on
    NAS-Bench-Macro the one between (`mb3_k3`) trains 2.5x less and is under-rated (docs/benchmarks.md).
    Here every candidate has its rung, so a key's candidates train evenly. The largest path goes
    first (distillation's teacher), then the smallest; under FLOPs limits those are the extremes
    within them and a middle rung outside them is replaced by a random path within them.
    """

    def step_paths(self, space: ArchSpace) -> list[Arch]:
        rungs = space.most_candidates()
        middle = [ladder_arch(self.costs.flops, space, j, rungs) for j in range(1, rungs - 1)]
        return [self.extreme(True, space), self.extreme(False, space)] + [
            arch if self.within_limits(arch) else self.sample(space) for arch in middle] + [
            self.sample(space) for _ in range(self.paths - rungs)]


def make_sampler(config: SupernetConfig, costs: CostTable) -> PathSampler:
    """The config's path sampler, seeded with its seed."""
    if config.sampling == "fair":
        return FairSampler(costs, config.seed, config.flops_min, config.flops_max)
    if config.sampling in ("sandwich", "ladder"):
        rule = SandwichSampler if config.sampling == "sandwich" else LadderSampler
        return rule(costs, config.seed, config.sandwich_paths, config.flops_min, config.flops_max)
    return PathSampler(costs, config.seed, config.flops_min, config.flops_max)


def widest_path(net: Supernet) -> Supernet:
    """`net` with its path of the most parameters chosen: the memory estimate's (all candidates are held, one runs)."""
    sizes = {key: {name: sum(p.numel() for p in op.parameters()) for name, op in module.candidates.items()}
             for key, module in net.choice_modules().items() if isinstance(module, LayerChoice)}
    net.set_arch(extreme_arch(sizes, net.space, largest=True))
    return net


def recalibrate_bn(model: nn.Module, batches: list[torch.Tensor], autocast: Callable[[], Any]) -> None:
    """Re-estimate every BN layer's running statistics as the plain average over `batches`; leave the model in eval mode.

    A shared-weight subnet's BN statistics are a mixture over all paths trained so far; SPOS
    recomputes them for the chosen path before judging it. torch's `update_bn` resets them and
    averages cumulatively (momentum None), as SPOS does.
    """
    with autocast():
        update_bn(batches, model)
    model.eval()


class SubnetScore(NamedTuple):
    """A judged subnet's held-out top-1 and top-5 accuracy and mean cross-entropy."""

    top1: float
    top5: float
    loss: float


@torch.no_grad()
def accuracy(model: nn.Module, loader: DeviceLoader, autocast: Callable[[], Any]) -> SubnetScore:
    """Top-1, top-5 and mean cross-entropy of the model as it is (eval mode)."""
    model.eval()
    top1 = torch.zeros((), dtype=torch.long, device=loader.labels.device)
    top5 = torch.zeros((), dtype=torch.long, device=loader.labels.device)
    loss = torch.zeros((), dtype=torch.float64, device=loader.labels.device)
    with autocast():
        for x, y in loader:
            logits = model(x)
            best = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += (best[:, 0] == y).sum()
            top5 += (best == y[:, None]).any(1).sum()
            loss += F.cross_entropy(logits.float(), y, reduction="sum")
    n = len(loader.labels)
    return SubnetScore(top1.item() / n, top5.item() / n, loss.item() / n)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, BN layers normalise with each batch's own statistics, in eval mode too; running ones untouched.

    The alternative to recalibration (Yu et al. 2020, "How to train your super-net"): no
    calibration passes, but a judged batch must be large enough for its statistics to be stable.
    (torch's BN uses batch statistics in eval mode exactly when it holds no running ones.)
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean, m.running_var) for m in norms]
    for m in norms:
        m.running_mean = m.running_var = None
    try:
        yield
    finally:
        for m, (mean, var) in zip(norms, saved):
            m.running_mean, m.running_var = mean, var


def evaluate_subnet(net: Supernet | FewShotSupernet, arch: Arch, bn_batches: list[torch.Tensor], loader: DeviceLoader,
                    autocast: Callable[[], Any], bn_eval: str = "recalibrate") -> SubnetScore:
    """One path's held-out figures: select it, then recalibrate BN (or use batch statistics, see BN_EVALS), evaluate."""
    net.set_arch(arch)
    model = net.active_network()  # a few-shot run recalibrates only the sub-supernet the path runs in
    if bn_eval == "batch":
        with batch_statistics(model):
            return accuracy(model, loader, autocast)
    recalibrate_bn(model, bn_batches, autocast)
    return accuracy(model, loader, autocast)


def calibration_batches(loader: DeviceLoader, count: int, seed: int) -> list[torch.Tensor]:
    """`count` augmented training batches drawn with their own generator (the training RNG is untouched)."""
    saved = loader.generator.get_state()
    loader.generator.manual_seed(seed)
    order = torch.randperm(len(loader.labels), device=loader.labels.device, generator=loader.generator)
    size = loader.batch_size
    batches = [loader.batch(order[i * size:(i + 1) * size])
               for i in range(min(count, len(order) // size))]
    loader.generator.set_state(saved)
    return batches


def reference_panel(costs: CostTable, space: ArchSpace, size: int, seed: int,
                    flops_min: float | None, flops_max: float | None) -> dict[str, Arch]:
    """The per-epoch reference subnets: largest, smallest and `size` seeded random paths."""
    panel = {"largest": costs.extreme(True, space), "smallest": costs.extreme(False, space)}
    sampler = PathSampler(costs, seed, flops_min, flops_max)
    for i in range(size):
        panel[f"random{i + 1}"] = sampler.sample(space)
    return panel


def shrink_space(net: Supernet, space: ArchSpace, samples: int, seed: int,
                 evaluate: Callable[[Arch], float]) -> tuple[ArchSpace, dict[str, Any]]:
    """Drop the worst candidate of every key (never the last), judged over sampled subnets.

    Subnets come in rounds: in each round every key walks through a random permutation of its
    candidates. A candidate's score is the mean accuracy of the subnets where it is active (a
    body conv beyond the skip depth is not), so body candidates that were not active in
    `samples` subnets get extra subnets with the deepest skip. Keys that no skip can reach are
    kept whole.
    """
    rng = random.Random(seed)
    choices = space.choices()
    width = space.most_candidates()
    archs = []
    for _ in range(samples):
        perms = {k: rng.sample(c, len(c)) for k, c in choices.items()}
        archs += [{k: p[j % len(p)] for k, p in perms.items()} for j in range(width)]
    counts = {k: {c: 0 for c in v} for k, v in choices.items()}
    for arch in archs:
        for key in space.active_keys(arch):
            counts[key][arch[key]] += 1
    for key, candidates in choices.items():
        skip_key = key.rsplit(".", 1)[0] + ".skip"
        deepest = {skip_key: max(choices[skip_key], key=skip_depth)} if skip_key in choices else {}
        for candidate in candidates:
            while counts[key][candidate] < samples and key in space.active_keys({**archs[0], **deepest}):
                arch = {k: rng.choice(c) for k, c in choices.items()} | {key: candidate, **deepest}
                archs.append(arch)
                for active in space.active_keys(arch):
                    counts[active][arch[active]] += 1
    scores: dict[str, dict[str, list[float]]] = {k: {c: [] for c in v} for k, v in choices.items()}
    for arch in archs:
        acc = evaluate(arch)
        for key in space.active_keys(arch):
            scores[key][arch[key]].append(acc)
    kept, dropped, means = {}, {}, {}
    for key, by_candidate in scores.items():
        means[key] = {c: (sum(v) / len(v) if v else None) for c, v in by_candidate.items()}
        kept[key] = list(choices[key])
        if len(kept[key]) > 1 and all(v is not None for v in means[key].values()):
            worst = min(reversed(kept[key]), key=lambda c: means[key][c])
            kept[key].remove(worst)
            dropped[key] = worst
    record = {"subnets": len(archs), "dropped": dropped, "scores": means, "counts": counts}
    return space.restrict(kept), record


# ---------------------------------------------------------------------------------------------
# Data-parallel pieces


class _GlobalSum(torch.autograd.Function):
    """A sum over the ranks whose gradient is the sum of the ranks' gradients.

    Ours because torch 2.13 deprecates torch.distributed.nn.functional.all_reduce, and the
    replacement it names (torch.distributed._functional_collectives) is private.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks, with autograd."""
    return _GlobalSum.apply(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch across all ranks.

    nn.SyncBatchNorm does this on CUDA only; this is its counterpart for gloo (CPU): sums and sums
    of squares are all-reduced with autograd, so gradients flow as if one process saw the whole
    batch. Without gradients (BN recalibration, evaluation) it is a plain local BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled() and dist.is_initialized()):
            return super().forward(x)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in at least fp32
        count = xf.numel() // xf.shape[1] * dist.get_world_size()
        mean = global_sum(xf.sum((0, 2, 3))) / count
        centred = xf - mean[None, :, None, None]  # two passes: E[x^2] - E[x]^2 loses digits
        var = global_sum((centred * centred).sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * count / max(count - 1, 1)).to(self.running_var.dtype), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        out = xf * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]
        return out.to(x.dtype)


def use_global_batch_norm(model: nn.Module) -> None:
    """Swap every BatchNorm2d of `model` for a GlobalBatchNorm2d (same parameters and buffers)."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d


def global_batch_norm(net: nn.Module, device: torch.device) -> None:
    """Batch norm over the global batch, in place (same parameters and buffers): nn.SyncBatchNorm on CUDA,
    GlobalBatchNorm2d elsewhere."""
    if any(isinstance(m, SlicedBatchNorm2d) for m in net.modules()):
        raise ConfigError("supernet: field 'space': expected a space without width choices when training on several "
                          "processes (sliced batch norm is not synchronised), got one with width choices")
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(net)  # replaces net's BatchNorm children in place
    else:
        use_global_batch_norm(net)


def average_gradients(net: nn.Module, world: int) -> None:
    """Average over the ranks the gradients of the parameters this step's paths used, in one all-reduce.

    Every rank trains the same paths (same seeds), so the same parameters hold gradients on every
    rank, and parameters off the paths keep none (SGD skips them, as in one process). Not DDP:
    its reducer expects one forward per backward and would hand unused weights zero gradients,
    which multi-path steps (sandwich, fair, distillation) and sub-supernets do not fit.
    """
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (one process, rank 0 of 1, without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (even with one process: same code path as N)

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)), "RANK" in env)

    @property
    def main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically write `state` with a header and SHA-256 digest, so corruption is detected on load."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    atomic_write(path, CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; ValueError if it is truncated or corrupt."""
    raw = path.read_bytes()
    head = len(CHECKPOINT_MAGIC)
    if raw[:head] != CHECKPOINT_MAGIC:
        raise ValueError("not an effcifar checkpoint (bad header)")
    digest, payload = raw[head:head + 32], raw[head + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    return sorted((run_dir / "checkpoints").glob("step_*.pt"), reverse=True)


def latest_checkpoint(run_dir: Path, map_location: str | torch.device, warn: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest checkpoint that loads and verifies; bad ones are reported and skipped."""
    for path in checkpoint_files(run_dir):
        try:
            return read_checkpoint(path, map_location)
        except (ValueError, RuntimeError, OSError, EOFError) as e:
            warn(f"{path}: {e}; trying the previous checkpoint")
    return None


def rng_states(device: torch.device) -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Inverse of `rng_states`."""
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps (restores the old handlers on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class SupernetResult:
    """What a supernet run produced."""

    net: Supernet
    space: ArchSpace  # the (possibly shrunk) space at the end
    history: list[dict[str, Any]]
    shrink_log: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path | None = None


@dataclass
class Progress:
    """The resumable position of a run (everything besides weights, optimiser and generators)."""

    epoch: int = 0  # completed epochs
    step: int = 0  # step within the current epoch
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    shrink_log: list[dict[str, Any]] = field(default_factory=list)
    train_time: float = 0.0


class SupernetTrainer:
    """A SPOS supernet run: its network, optimiser step, path sampler, data order and position.

    `train_step(x, y, lr)` is the one place where a step's path is drawn (by `sampler`) and
    trained (by `step`, the core trainer's TrainStep: `step.backward` then `step.update`).
    `train_epoch`, `end_epoch` (panel, shrinking) and `fit` drive it; `state_dict()` is the
    checkpoint, and `load_state_dict` continues from one bitwise-identically (on CPU).
    """

    def __init__(self, config: SupernetConfig, data: CifarData | None = None, out: Path | None = None,
                 ranks: Ranks | None = None):
        config.validate()
        self.config, self.out, self.ranks = config, out, ranks or Ranks.from_env()
        self.space = ArchSpace.load(config.space)
        if config.threads:
            torch.set_num_threads(config.threads)
        device = resolve_device(config.device)
        if self.ranks.launched and device.type == "cuda":
            device = torch.device("cuda", self.ranks.local_rank)
        if self.ranks.launched and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if config.batch_size % self.ranks.world:
            raise field_error("batch_size", f"a multiple of the number of processes ({self.ranks.world})",
                              config.batch_size)
        self.device, self.precision = device, resolve_precision(config.precision, device)
        self.data = data if data is not None else load_dataset(config.dataset, config.data_dir)
        check_memory(config.train_config(), self.data, device, self.precision,
                     lambda: widest_path(Supernet(self.space, config.channels(), self.data.num_classes)))
        self.train_loader, self.valid_loader = device_loaders(config.train_config(), self.data, device)

        seed_everything(config.seed)
        self.net = Supernet(self.space, config.channels(), self.data.num_classes, config.logits_weight,
                            config.canonical_paths).to(device)
        if config.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if self.ranks.launched:
            global_batch_norm(self.net, device)
        self.step = self.train_step_for(self.net)
        self.costs = CostTable.build(self.space, config.channels(), self.data.num_classes)
        self.sampler = make_sampler(config, self.costs)
        self.sampler.sample(self.space)  # fail now, not after data loading on every rank, if no path is allowed
        self.sampler.rng.seed(config.seed)
        self.split: int | None = None  # the sub-supernet being trained (few-shot), None while one-shot
        self.bn_batches = calibration_batches(self.train_loader, config.bn_batches, config.seed + 1)
        self.progress = Progress()
        self.order: torch.Tensor | None = None  # the current epoch's data order
        self.epoch_sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images

    def train_step_for(self, net: nn.Module) -> TrainStep:
        """The core trainer's step on `net` (a fresh optimiser); under torchrun, gradients averaged over ranks."""
        before_update = (lambda: average_gradients(net, self.ranks.world)) if self.ranks.launched else None
        return TrainStep(net, self.config.train_config(), self.precision, before_update=before_update)

    # ---- one step, one epoch -------------------------------------------------------------

    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.lr_at(self.progress.epoch + self.progress.step / len(self.train_loader))

    def lr_at(self, epoch: float) -> float:
        """The schedule at a fractional epoch; a sub-supernet retraces its last `few_shot_epochs` (a warm restart's tail)."""
        c = self.config
        if self.split is not None:
            epoch = c.epochs - c.few_shot_epochs + epoch - c.epochs - self.split * c.few_shot_epochs
        return c.lr_at(max(epoch, 0.0))

    # ---- few-shot splits ------------------------------------------------------------------

    def split_candidates(self) -> list[str]:
        """Candidates of `few_shot_key`, one sub-supernet each (none for a one-shot run)."""
        return self.space.choices()[self.config.few_shot_key] if self.config.few_shot_key else []

    def total_epochs(self) -> int:
        """One-shot epochs, then `few_shot_epochs` per sub-supernet."""
        return self.config.epochs + len(self.split_candidates()) * self.config.few_shot_epochs

    def enter_split(self, index: int) -> None:
        """Train sub-supernet `index` from now on (splitting the one-shot supernet first): a fresh optimiser."""
        key, candidates = self.config.few_shot_key, self.split_candidates()
        if not isinstance(self.net, FewShotSupernet):
            self.net = FewShotSupernet(self.net, key, candidates)
        self.split, candidate = index, candidates[index]
        self.step = self.train_step_for(self.net.split(candidate))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global batch, augmented."""
        size, world, rank = self.config.batch_size, self.ranks.world, self.ranks.rank
        if self.order is None:
            self.order = torch.randperm(len(self.train_loader.labels), device=self.device,
                                        generator=self.train_loader.generator)
        index = self.order[self.progress.step * size:(self.progress.step + 1) * size]
        shard = slice(rank * size // world, (rank + 1) * size // world)
        return self.train_loader.batch(index)[shard], self.train_loader.labels[index][shard]

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the step's paths, add their gradients on (x, y), update at `lr`; return (mean loss, first logits)."""
        passes = self.backward_paths(x, y)
        self.step.update(lr)
        return torch.stack([loss for _, loss, _ in passes]).mean(), passes[0][2]

    def backward_paths(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[Arch, torch.Tensor, torch.Tensor]]:
        """Forward and backward of each of the step's paths (gradients averaged); (path, loss, logits) of each.

        The average, not the sum (BigNAS and FairNAS add them up): then the learning rate means the
        same step size whatever the number of paths, and a sampling switch needs no LR retuning
        (summed, a 4-path sandwich step at the quick preset's LR left the supernet at chance:
        docs/benchmarks.md). With `distill`, the largest path goes first and learns the labels; the
        others learn its predicted probabilities on the same images (BigNAS/OFA in-place distillation).
        """
        space = self.step_space()
        paths = self.sampler.step_paths(space)
        if self.config.distill:
            largest = self.sampler.extreme(True, space)
            paths = paths if paths[0] == largest else [largest] + paths  # sandwich's first path is the largest
        passes, teacher = [], None
        for arch in paths:
            self.net.set_arch(arch)
            loss, logits = self.step.backward(x, y, soft_targets=teacher, weight=1 / len(paths))
            if self.config.distill and teacher is None:
                teacher = logits.float().softmax(1)
            passes.append((arch, loss, logits))
        return passes

    def step_space(self) -> ArchSpace:
        """The space this step draws from: the current (shrunk) space, with a split's candidate fixed at
        few_shot_key and, before `depth_from`, each skip at its deepest (OFA's elastic depth comes after the
        ops are trained at full depth)."""
        choices = self.space.choices()
        fixed = {self.config.few_shot_key: [self.split_candidates()[self.split]]} if self.split is not None else {}
        if self.progress.epoch < self.config.depth_from:
            fixed.update({key: [max(c, key=skip_depth)] for key, c in choices.items() if key.endswith(".skip")})
        return self.space.restrict({**choices, **fixed}) if fixed else self.space

    def train_epoch(self, stop: Callable[[], bool] = lambda: False,
                    on_step: Callable[[int, int, int], None] | None = None) -> None:
        """The remaining steps of the current epoch; TrainingInterrupted (after a checkpoint) when `stop()`."""
        steps = len(self.train_loader)
        start = time.perf_counter()
        self.step.model_to_run.train()
        while self.progress.step < steps:
            if stop():
                self.progress.train_time += time.perf_counter() - start
                self.save_checkpoint()
                raise TrainingInterrupted(
                    f"stopped at epoch {self.progress.epoch + 1}, step {self.progress.step}; checkpoint saved"
                    + (f" in {self.out / 'checkpoints'}; continue with --resume" if self.out is not None else ""))
            x, y = self.batch()
            loss, logits = self.train_step(x, y, self.lr())
            ones = torch.tensor(float(len(y)), dtype=torch.float64, device=self.device)
            self.epoch_sums += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double(), ones])
            self.progress.step += 1
            self.progress.global_step += 1
            if on_step is not None:
                on_step(self.progress.epoch + 1, self.progress.step, steps)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.progress.train_time += time.perf_counter() - start

    def end_epoch(self, epoch_start: float) -> dict[str, Any]:
        """Close the epoch begun at `epoch_start`: training figures, the panel, shrinking if due; its log row."""
        if self.ranks.launched:
            dist.all_reduce(self.epoch_sums)
        loss_sum, correct, seen = self.epoch_sums.tolist()
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"supernet train loss is {loss_sum} at epoch {self.progress.epoch + 1}")
        self.progress.epoch += 1
        eval_start = time.perf_counter()
        accs = self.panel()
        row: dict[str, Any] = {
            "epoch": self.progress.epoch, "lr": self.lr_at(self.progress.epoch),
            "train_loss": loss_sum / seen, "train_acc": correct / seen,
            **{f"valid_{name}": acc for name, acc in accs.items()},
            "valid_panel_mean": sum(accs.values()) / len(accs), "space_size": self.space.size(),
        }
        if self.progress.epoch in self.config.shrink_epochs():
            self.shrink()
        row.update(epoch_time=time.perf_counter() - epoch_start, eval_time=time.perf_counter() - eval_start,
                   train_time=self.progress.train_time)
        self.progress.history.append(row)
        self.progress.step = 0
        self.order = None
        self.epoch_sums.zero_()
        return row

    # ---- evaluation and shrinking ----------------------------------------------------------

    def evaluate(self, arch: Arch) -> float:
        """Held-out top-1 of one path (BN as `bn_eval` says)."""
        return evaluate_subnet(self.net, arch, self.bn_batches, self.valid_loader, self.step.autocast,
                               self.config.bn_eval)[0]

    def panel(self) -> dict[str, float]:
        """Held-out accuracy of the reference subnets (largest, smallest, seeded random ones)."""
        c = self.config
        archs = reference_panel(self.costs, self.space, c.panel_random, c.seed + 2, c.flops_min, c.flops_max)
        return {name: self.evaluate(arch) for name, arch in archs.items()}

    def shrink(self) -> None:
        """Drop each key's worst candidate (see `shrink_space`) and log it."""
        seed = self.config.seed + 3 + self.progress.epoch
        self.space, record = shrink_space(self.net, self.space, self.config.shrink_samples, seed, self.evaluate)
        self.progress.shrink_log.append({"epoch": self.progress.epoch, **record, "space": self.space.choices()})

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the rest of the run depends on: the checkpoint."""
        return {
            "fingerprint": self.config.fingerprint(), "model": self.net.state_dict(),
            "optimizer": self.step.optimizer.state_dict(), "scaler": self.step.scaler.state_dict(),
            "sampler": self.sampler.state_dict(), "loader_generator": self.train_loader.generator.get_state(),
            "rng": rng_states(self.device), "order": self.order, "epoch_sums": self.epoch_sums.cpu(),
            "space": self.space.choices(), "progress": asdict(self.progress), "split": self.split,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint of a run with the same config (ConfigError otherwise)."""
        if state["fingerprint"] != self.config.fingerprint():
            raise ConfigError(
                f"the checkpoint was made with a different config (fingerprint {state['fingerprint']} vs "
                f"{self.config.fingerprint()}); resume with the run's own config.yaml or start a new --out")
        self.space = self.space.restrict(state["space"])
        if state["split"] is not None:
            self.enter_split(state["split"])
        self.net.load_state_dict(state["model"])
        self.step.optimizer.load_state_dict(state["optimizer"])
        self.step.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.train_loader.generator.set_state(state["loader_generator"].cpu())
        set_rng_states(state["rng"], self.device)
        self.order = state["order"]
        self.epoch_sums = state["epoch_sums"].to(self.device)
        self.progress = Progress(**state["progress"])

    def save_checkpoint(self) -> None:
        """Write the checkpoint into out/checkpoints (rank 0) and keep the newest `keep_checkpoints`."""
        if self.out is None or not self.ranks.main:
            return
        save_checkpoint(self.state_dict(), self.out / "checkpoints" / f"step_{self.progress.global_step:09d}.pt")
        for old in checkpoint_files(self.out)[self.config.keep_checkpoints:]:
            old.unlink(missing_ok=True)

    def resume(self, warn: Callable[[str], None]) -> None:
        """Continue from the newest good checkpoint in out/checkpoints (ConfigError if none loads)."""
        state = latest_checkpoint(self.out, self.device, warn)  # type: ignore[arg-type]
        if state is None:
            raise ConfigError(f"{self.out}: no usable checkpoint to resume from (all failed their checks)")
        try:
            self.load_state_dict(state)
        except ConfigError as e:
            raise ConfigError(f"{self.out}: {e}") from None

    # ---- the run ---------------------------------------------------------------------------

    def write_files(self) -> None:
        """config.yaml, logs.tsv, space.json and shrink_log.json of the run so far (rank 0)."""
        if self.out is None or not self.ranks.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.out / "config.yaml")
        if self.progress.history:
            write_tsv(self.out / "logs.tsv", self.progress.history)
        atomic_write(self.out / "space.json", json.dumps(self.space.choices(), indent=2) + "\n")
        atomic_write(self.out / "shrink_log.json", json.dumps(self.progress.shrink_log, indent=2) + "\n")

    def fit(self, on_step: Callable[[int, int, int], None] | None = None,
            on_epoch: Callable[[dict[str, Any]], None] | None = None) -> SupernetResult:
        """Train the remaining epochs (checkpoint after each; SIGTERM/SIGINT checkpoint and stop); write the results."""
        self.write_files()
        start = time.perf_counter()
        with StopSignal() as stop:
            while self.progress.epoch < self.total_epochs():
                epoch_start = time.perf_counter()
                if self.progress.epoch >= self.config.epochs:
                    index = (self.progress.epoch - self.config.epochs) // self.config.few_shot_epochs
                    if index != self.split:
                        self.enter_split(index)
                self.train_epoch(lambda: stop_requested(stop, self.ranks, self.device), on_step)
                row = self.end_epoch(epoch_start)
                self.write_files()
                self.save_checkpoint()
                if on_epoch is not None:
                    on_epoch(row)
        summary = self.summary(time.perf_counter() - start)
        if self.out is not None and self.ranks.main:
            save_checkpoint({"model": self.net.state_dict(), "space": ArchSpace.load(self.config.space).to_dict(),
                             "choices": self.space.choices(), "channels": self.config.channels(),
                             "num_classes": self.data.num_classes, "logits_weight": self.config.logits_weight,
                             "few_shot": self.few_shot_record(), "canonical_paths": self.config.canonical_paths},
                            self.out / "supernet.pt")
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return SupernetResult(self.net, self.space, self.progress.history, self.progress.shrink_log, summary, self.out)

    def few_shot_record(self) -> dict[str, Any] | None:
        """The split of a few-shot run (key and candidates, one sub-supernet each), None for a one-shot run."""
        if not isinstance(self.net, FewShotSupernet):
            return None
        return {"key": self.net.key, "candidates": list(self.net.splits), "epochs": self.config.few_shot_epochs}

    def summary(self, total_time: float) -> dict[str, Any]:
        """What summary.json holds."""
        data, history = self.data, self.progress.history
        return {
            "config": asdict(self.config), "space": self.space.to_dict(), "choices": self.space.choices(),
            "space_size": self.space.size(),
            "dataset": {"name": data.name, "source": data.source, "num_classes": data.num_classes,
                        "train_images": len(self.train_loader.labels), "valid_images": len(self.valid_loader.labels)},
            "epochs": self.config.epochs, "few_shot": self.few_shot_record(),
            "train_time": self.progress.train_time, "total_time": total_time,
            "final_panel": {k: v for k, v in history[-1].items() if k.startswith("valid_")},
            "processes": self.ranks.world, "device": device_name(self.device), "precision": self.precision,
            "malloc": allocator_in_effect(), "versions": library_versions(),
        }


def train_supernet(
    config: SupernetConfig, out_dir: str | Path | None = None, *, resume: bool = False, data: CifarData | None = None,
    on_step: Callable[[int, int, int], None] | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
    warn: Callable[[str], None] = print,
) -> SupernetResult:
    """Train a SPOS supernet; write logs, checkpoints and `supernet.pt` into `out_dir` (rank 0).

    `on_step(epoch, step, steps_per_epoch)` and `on_epoch(row)` report progress. With
    `resume`, the newest good checkpoint in `out_dir/checkpoints` is continued (there must be one,
    made with the same config); without it, a directory that has checkpoints is refused. Rank 0
    holds the run directory's lock while it trains.
    """
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ConfigError("resume needs the run directory (--out) that holds the checkpoints")
    config.validate()
    writer = out is not None and Ranks.from_env().main  # under torchrun, rank 0 writes (and locks) the directory
    with locked(out, "supernet") if writer else contextlib.nullcontext():
        if out is not None and not resume and checkpoint_files(out):
            raise ConfigError(f"{out}: already holds a supernet run; pass --resume to continue it or choose "
                              f"another --out")
        if resume and not checkpoint_files(out):  # type: ignore[arg-type]
            raise ConfigError(f"{out}: no checkpoint to resume from (expected {out}/checkpoints/step_*.pt); "
                              f"check --out, or start the run without --resume")
        trainer = SupernetTrainer(config, data, out)
        if resume:
            trainer.resume(warn)
        return trainer.fit(on_step, on_epoch)


def stop_requested(stop: StopSignal, ranks: Ranks, device: torch.device) -> bool:
    """True when any rank got a stop signal (all ranks then stop at the same step)."""
    if not ranks.launched:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _as_tuple(value: Any) -> Any:
    """random.Random state from its checkpointed form (lists back to tuples)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_supernet(run_dir: str | Path, map_location: str | torch.device = "cpu",
                  ) -> tuple[Supernet | FewShotSupernet, ArchSpace, SupernetConfig]:
    """(trained supernet, its final space, its config) from a finished run directory (few-shot: its sub-supernets)."""
    run = Path(run_dir)
    path = run / "supernet.pt"
    if not path.exists():
        raise ConfigError(f"{run}: no supernet.pt (is this a finished `effcifar supernet train` run?)")
    try:
        state = read_checkpoint(path, map_location)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    config = build_config(SupernetConfig, run / "config.yaml")
    full = ArchSpace.from_dict(state["space"], str(path))
    net: Supernet | FewShotSupernet = Supernet(full, state["channels"], state["num_classes"], state["logits_weight"],
                                               state.get("canonical_paths", False))
    if state.get("few_shot"):
        net = FewShotSupernet(net, state["few_shot"]["key"], state["few_shot"]["candidates"])
    net.load_state_dict(state["model"])
    return net, full.restrict(state["choices"]), config
