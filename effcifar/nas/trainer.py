"""Single-path one-shot (SPOS) supernet training with exact resume, hooks for experiments and data parallel.

Each step draws its paths with the config's path sampler (`effcifar.nas.path_samplers`: uniform,
fair or sandwich, only paths within a FLOPs range if one is set) and trains them with the core
trainer's step: device-resident batches, label smoothing, SGD Nesterov, autocast. After every
epoch a fixed panel of reference subnets (largest, smallest, seeded random ones) is evaluated on
held-out training images after BN recalibration, so `logs.tsv` shows whether the supernet learns.

Hooks (`TrainerHook`) are the seam for experiments: each is called before every step and after
every epoch with the trainer. The product's own optional behaviour, search-space shrinking at the
`shrinking.shrink_at` epochs, is one (`SpaceShrinking`).

Checkpoints (`effcifar.nas.checkpoint`) are written after every epoch and when the process gets
SIGTERM/SIGINT; a run resumed from one ends bitwise-identical to an uninterrupted run on CPU.
Under `torchrun` the ranks train one global batch together (`effcifar.nas.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from effcifar.allocator import allocator_in_effect
from effcifar.atomic import atomic_write
from effcifar.config import changed_fields, field_error, save_config
from effcifar.data import CifarData, load_dataset
from effcifar.device import device_name, resolve_device, resolve_precision
from effcifar.errors import ConfigError, Interrupted, TrainingDiverged
from effcifar.nas.checkpoint import (
    StopSignal, checkpoint_files, latest_checkpoint, rng_states, save_checkpoint, set_rng_states,
)
from effcifar.nas.costs import CostTable, extreme_arch
from effcifar.nas.distributed import Ranks, any_rank, average_gradients, global_batch_norm
from effcifar.nas.evaluation import calibration_batches, evaluate_subnet, reference_panel
from effcifar.nas.network import LayerChoice, Supernet
from effcifar.nas.path_samplers import path_sampler
from effcifar.nas.shrinking import shrink_space
from effcifar.nas.space import Arch, ArchSpace
from effcifar.nas.supernet import SupernetConfig
from effcifar.rundir import locked
from effcifar.train import TrainStep, check_memory, device_loaders, library_versions, seed_everything, write_tsv


class TrainingInterrupted(Interrupted):
    """SIGTERM/SIGINT arrived; a checkpoint was saved, and `resume_with` says how to continue (the command's way)."""

    def __init__(self, stopped: str, resume_with: str = "continue with --resume"):
        super().__init__(f"{stopped}; {resume_with}")
        self.stopped = stopped


class TrainerHook:
    """A seam in supernet training for experiments: override either method (both do nothing here).

    A hook keeps what must survive a resume in the trainer (its space, `progress`), not in itself,
    so a resumed run stays exact. Pass hooks to `train_supernet(..., hooks=[...])`.
    """

    def before_step(self, trainer: SupernetTrainer) -> None:
        """Called before each training step draws its paths (`trainer.progress` is the step's position)."""

    def after_epoch(self, trainer: SupernetTrainer, row: dict[str, Any]) -> None:
        """Called after each epoch's panel; `row` is the epoch's log row (a hook may add columns)."""


class SpaceShrinking(TrainerHook):
    """After each of `epochs`, every key loses its worst candidate (see `shrink_space`); logged in shrink_log.json."""

    def __init__(self, epochs: Sequence[int], samples: int):
        self.epochs, self.samples = set(epochs), samples

    def after_epoch(self, trainer: SupernetTrainer, row: dict[str, Any]) -> None:
        epoch = trainer.progress.epoch
        if epoch not in self.epochs:
            return
        seed = trainer.config.seed + 3 + epoch
        trainer.space, record = shrink_space(trainer.space, self.samples, seed, trainer.evaluate)
        trainer.progress.shrink_log.append({"epoch": epoch, **record, "space": trainer.space.choices()})


def widest_path(net: Supernet) -> Supernet:
    """`net` with its path of the most parameters chosen: the memory estimate's (all candidates are held, one runs)."""
    sizes = {key: {name: sum(p.numel() for p in op.parameters()) for name, op in module.candidates.items()}
             for key, module in net.choice_modules().items() if isinstance(module, LayerChoice)}
    net.set_arch(extreme_arch(sizes, net.space, largest=True))
    return net


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
    """A SPOS supernet run: its network, optimiser step, path sampler, hooks, data order and position.

    `train_step(x, y, lr)` is the one place where a step's paths are drawn (by `sampler`) and
    trained (by `step`, the core trainer's TrainStep: `step.backward` then `step.update`).
    `train_epoch`, `end_epoch` (panel, hooks) and `fit` drive it; `state_dict()` is the
    checkpoint, and `load_state_dict` continues from one bitwise-identically (on CPU).
    """

    def __init__(self, config: SupernetConfig, data: CifarData | None = None, out: Path | None = None,
                 ranks: Ranks | None = None, hooks: Sequence[TrainerHook] = ()):
        config.validate()
        self.config, self.out, self.ranks = config, out, ranks or Ranks.from_env()
        self.space = ArchSpace.load(config.space)
        self.device = self.join_ranks()
        self.precision = resolve_precision(config.precision, self.device)
        self.data = data if data is not None else load_dataset(config.dataset, config.data_dir)
        check_memory(config.train_config(), self.data, self.device, self.precision,
                     lambda: widest_path(Supernet(self.space, config.channels(), self.data.num_classes)))
        self.train_loader, self.valid_loader = device_loaders(config.train_config(), self.data, self.device)

        seed_everything(config.seed)
        self.net = Supernet(self.space, config.channels(), self.data.num_classes,
                            config.widths.logits_weight).to(self.device)
        if config.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if self.ranks.launched:
            global_batch_norm(self.net, self.device)
        before_update = (lambda: average_gradients(self.net, self.ranks.world)) if self.ranks.launched else None
        self.step = TrainStep(self.net, config.train_config(), self.precision, before_update=before_update,
                              fused=False)  # paths: a changing set of parameters with gradients
        self.costs = CostTable.build(self.space, config.channels(), self.data.num_classes)
        self.sampler = path_sampler(config.sampling, config.sampler, config.seed, self.costs)
        self.sampler.sample(self.space)  # fail now, not after data loading on every rank, if no path is allowed
        self.sampler.rng.seed(config.seed)
        shrink_epochs = config.shrinking.epochs(config.epochs)
        shrinking = [SpaceShrinking(shrink_epochs, config.shrinking.shrink_samples)] if shrink_epochs else []
        self.hooks = [*shrinking, *hooks]
        self.bn_batches = calibration_batches(self.train_loader, config.evaluation.bn_batches, config.seed + 1)
        self.progress = Progress()
        self.order: torch.Tensor | None = None  # the current epoch's data order
        self.epoch_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, images

    def join_ranks(self) -> torch.device:
        """This process's device; under torchrun, its local GPU and the process group (joined once)."""
        config = self.config
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
        return device

    # ---- one step, one epoch -------------------------------------------------------------

    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.config.lr_at(self.progress.epoch + self.progress.step / len(self.train_loader))

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
        docs/benchmarks.md).
        """
        paths = self.sampler.step_paths(self.space)
        passes = []
        for arch in paths:
            self.net.set_arch(arch)
            loss, logits = self.step.backward(x, y, weight=1 / len(paths))
            passes.append((arch, loss, logits))
        return passes

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
                    + (f" in {self.out / 'checkpoints'}" if self.out is not None else ""))
            for hook in self.hooks:
                hook.before_step(self)
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
        """Close the epoch begun at `epoch_start`: training figures, the panel, the hooks; its log row."""
        if self.ranks.launched:
            dist.all_reduce(self.epoch_sums)
        loss_sum, correct, seen = self.epoch_sums.tolist()
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"supernet train loss is {loss_sum} at epoch {self.progress.epoch + 1}")
        self.progress.epoch += 1
        eval_start = time.perf_counter()
        accs = self.panel()
        row: dict[str, Any] = {
            "epoch": self.progress.epoch, "lr": self.config.lr_at(self.progress.epoch),
            "train_loss": loss_sum / seen, "train_acc": correct / seen,
            **{f"valid_{name}": acc for name, acc in accs.items()},
            "valid_panel_mean": sum(accs.values()) / len(accs), "space_size": self.space.size(),
        }
        for hook in self.hooks:
            hook.after_epoch(self, row)
        row.update(epoch_time=time.perf_counter() - epoch_start, eval_time=time.perf_counter() - eval_start,
                   train_time=self.progress.train_time)
        self.progress.history.append(row)
        self.progress.step = 0
        self.order = None
        self.epoch_sums.zero_()
        return row

    def evaluate(self, arch: Arch) -> float:
        """Held-out top-1 of one path, after BN recalibration."""
        return evaluate_subnet(self.net, arch, self.bn_batches, self.valid_loader, self.step.autocast)[0]

    def panel(self) -> dict[str, float]:
        """Held-out accuracy of the reference subnets (largest, smallest, seeded random ones)."""
        c = self.config
        archs = reference_panel(self.costs, self.space, c.evaluation.panel_random, c.seed + 2, c.sampler.flops_min,
                                c.sampler.flops_max)
        return {name: self.evaluate(arch) for name, arch in archs.items()}

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the rest of the run depends on: the checkpoint."""
        return {
            "fingerprint": self.config.fingerprint(), "settings": self.config.result_settings(),
            "model": self.net.state_dict(),
            "optimizer": self.step.optimizer.state_dict(), "scaler": self.step.scaler.state_dict(),
            "sampler": self.sampler.state_dict(), "loader_generator": self.train_loader.generator.get_state(),
            "rng": rng_states(self.device), "order": self.order, "epoch_sums": self.epoch_sums.cpu(),
            "space": self.space.choices(), "progress": asdict(self.progress),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint of a run with the same config (ConfigError otherwise)."""
        if state["fingerprint"] != self.config.fingerprint():
            changed = changed_fields(state.get("settings") or {}, self.config.result_settings()) \
                if state.get("settings") else []  # checkpoints from before settings were kept: no names
            raise ConfigError(
                "the checkpoint was made with other settings"
                + (f" ({', '.join(changed)} changed)" if changed else f" (fingerprint {state['fingerprint']})")
                + "; resume with the run's own config.yaml or start a new --out")
        self.space = self.space.restrict(state["space"])
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
            while self.progress.epoch < self.config.epochs:
                epoch_start = time.perf_counter()
                self.train_epoch(lambda: any_rank(stop.requested, self.ranks, self.device), on_step)
                row = self.end_epoch(epoch_start)
                self.write_files()
                self.save_checkpoint()
                if on_epoch is not None:
                    on_epoch(row)
        summary = self.summary(time.perf_counter() - start)
        if self.out is not None and self.ranks.main:
            save_checkpoint({"model": self.net.state_dict(), "space": ArchSpace.load(self.config.space).to_dict(),
                             "choices": self.space.choices(), "channels": self.config.channels(),
                             "num_classes": self.data.num_classes, "logits_weight": self.config.widths.logits_weight},
                            self.out / "supernet.pt")
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return SupernetResult(self.net, self.space, self.progress.history, self.progress.shrink_log, summary, self.out)

    def summary(self, total_time: float) -> dict[str, Any]:
        """What summary.json holds."""
        data, history = self.data, self.progress.history
        return {
            "config": asdict(self.config), "space": self.space.to_dict(), "choices": self.space.choices(),
            "space_size": self.space.size(),
            "dataset": {"name": data.name, "source": data.source, "num_classes": data.num_classes,
                        "train_images": len(self.train_loader.labels), "valid_images": len(self.valid_loader.labels)},
            "epochs": self.config.epochs, "train_time": self.progress.train_time, "total_time": total_time,
            "final_panel": {k: v for k, v in history[-1].items() if k.startswith("valid_")},
            "processes": self.ranks.world, "device": device_name(self.device), "precision": self.precision,
            "malloc": allocator_in_effect(), "versions": library_versions(),
        }


def train_supernet(
    config: SupernetConfig, out_dir: str | Path | None = None, *, resume: bool = False, data: CifarData | None = None,
    on_step: Callable[[int, int, int], None] | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
    warn: Callable[[str], None] = print, hooks: Sequence[TrainerHook] = (),
) -> SupernetResult:
    """Train a SPOS supernet; write logs, checkpoints and `supernet.pt` into `out_dir` (rank 0).

    `on_step(epoch, step, steps_per_epoch)` and `on_epoch(row)` report progress; `hooks` run
    inside training (see TrainerHook). With `resume`, the newest good checkpoint in
    `out_dir/checkpoints` is continued (there must be one, made with the same config); without
    it, a directory that has checkpoints is refused. Rank 0 holds the run directory's lock while
    it trains.
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
        trainer = SupernetTrainer(config, data, out, hooks=hooks)
        if resume:
            trainer.resume(warn)
        return trainer.fit(on_step, on_epoch)
