"""A supernet run's settings (`SupernetConfig`, the options of `effcifar supernet train`) and its result.

A single-path one-shot (SPOS) supernet trains paths of a declared space (`effcifar.nas.space`)
with the core trainer's step; `effcifar.nas.trainer` runs it (`train_supernet`), and
`load_supernet` reads a finished run back for the search. The HPO best's hyper-parameters come
in through `hparams` (a best.json): the fields of HPARAM_FIELDS.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from effcifar.config import (
    build_config, build_from_layers, check_types, execution, field_error, fingerprint, flat_values, nested, nested_names,
    read_config_file, result_values, setting,
)
from effcifar.errors import ConfigError
from effcifar.models import NETWORK_STAGES
from effcifar.nas.checkpoint import read_checkpoint
from effcifar.nas.evaluation import EvaluationFields
from effcifar.nas.network import Supernet
from effcifar.nas.path_samplers import PATH_SAMPLERS, SamplerFields, check_sampling
from effcifar.nas.shrinking import ShrinkingFields
from effcifar.nas.space import ArchSpace
from effcifar.train import AugmentFields, DataFields, ExecutionFields, OptimiserFields, TrainConfig, WidthFields

SCHEDULES = ("linear", "cosine")
# Fields that the hyper-parameter search decides; `hparams: best.json` supplies them.
HPARAM_FIELDS = (
    "dataset", "batch_size", "crop_pad", "flip", "cutout", "peak_lr", "base_wd", "momentum", "nesterov",
    "label_smoothing", "logits_weight", *NETWORK_STAGES,
)


@dataclass
class SupernetConfig(ExecutionFields, OptimiserFields, DataFields):
    """Everything a supernet run depends on; the defaults are the original series' SPOS setup.

    The learning rate is `lr_factor` x `peak_lr` (the seed trained the supernet at 0.3x the HPO
    learning rate), decayed per step to 0 over `epochs` (linear or cosine). Data, augmentation,
    optimiser, widths and execution are the core trainer's parts, with its checks.

    The top level is what a user chooses; the rest are groups (`nested`), whose keys files, options
    and the pipeline give flat (`bn_batches: 2`) or under the group (`evaluation: {bn_batches: 2}`, as
    config.yaml saves them): `widths` and `augment` (an HPO best's, through `hparams`), `sampler` (the
    path samplers' settings), `evaluation` (panel and BN recalibration) and `shrinking`. Build one
    from flat settings with `SupernetConfig.of`.
    """

    holdout: int = setting(5000, "held-out training images for the panel and shrinking (never the test set)")
    space: str = setting("seed", "a built-in space (seed, seed-widths, nas-bench-macro) or a YAML/JSON space file")
    hparams: str | None = execution(None, "best.json of an HPO run: widths, LR, weight decay, augmentation")
    epochs: int = setting(30, "epochs of supernet training")
    lr_factor: float = setting(0.3, "the learning rate is this times peak_lr")
    schedule: str = setting("linear", "how the learning rate decays to 0 over the epochs", SCHEDULES)
    warmup_epochs: float = setting(0.0, "the LR rises linearly from 0 over these epochs, then decays")
    sampling: str = setting("sandwich", "paths per step: uniform (SPOS, one), fair (FairNAS, one per candidate), "
                                        "sandwich (BigNAS: largest, smallest, random)", tuple(PATH_SAMPLERS))
    keep_checkpoints: int = execution(3, "checkpoints kept in the run directory (the newest)")
    widths: WidthFields = nested("the widths of the stages and the logits scale", WidthFields)
    augment: AugmentFields = nested("the training batches' augmentation", AugmentFields)
    sampler: SamplerFields = nested("the path samplers' settings: the FLOPs range of sampled paths, each rule's own",
                                    SamplerFields)
    evaluation: EvaluationFields = nested("how subnets are judged: the per-epoch panel, BN recalibration",
                                          EvaluationFields)
    shrinking: ShrinkingFields = nested("search-space shrinking: when, and on how many subnets", ShrinkingFields)

    @classmethod
    def of(cls, **settings: Any) -> "SupernetConfig":
        """A checked config from settings given flat (`layer1=16, bn_batches=2`), as files and options give them."""
        return build_from_layers(cls, [("SupernetConfig.of", settings, False)])

    def train_config(self) -> TrainConfig:
        """The core-trainer config of the shared fields (used for its checks and its step)."""
        values = flat_values(self)
        return TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig) if f.name in values})

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for the first bad value."""
        check_types(self)
        self.train_config().validate()
        for name in ("epochs", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise field_error(name, "a positive integer", getattr(self, name))
        if self.holdout <= 0:
            raise field_error("holdout", "a positive number of held-out training images", self.holdout)
        if not 0 <= self.warmup_epochs < self.epochs:
            raise field_error("warmup_epochs", f"a number in [0, epochs={self.epochs})", self.warmup_epochs)
        if not self.lr_factor > 0:
            raise field_error("lr_factor", "a number > 0", self.lr_factor)
        if self.schedule not in SCHEDULES:
            raise field_error("schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        check_sampling(self.sampling, self.sampler)
        self.evaluation.validate()
        self.shrinking.epochs(self.epochs)

    def channels(self) -> dict[str, int]:
        """Width of each named stage (what a space's `width: layer1` refers to)."""
        return {s: getattr(self.widths, s) for s in NETWORK_STAGES}

    def lr_at(self, epoch: float) -> float:
        """Learning rate at a fractional epoch: warm-up to lr_factor x peak_lr, then decayed to 0 at `epochs`."""
        top = self.lr_factor * self.peak_lr
        if epoch < self.warmup_epochs:
            return top * epoch / self.warmup_epochs
        t = min(max((epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs), 0.0), 1.0)
        return top * (1 - t) if self.schedule == "linear" else top * 0.5 * (1 + math.cos(math.pi * t))

    def fingerprint(self) -> str:
        """What a resumed run must match: the fields that change results (flat, as runs saved before the groups
        recorded them), and the space's content."""
        return fingerprint(self.result_settings())

    def result_settings(self) -> dict[str, Any]:
        """The values `fingerprint` hashes, kept in checkpoints so that a refused resume names what changed."""
        return json.loads(json.dumps({**result_values(self, flat=True), "space": ArchSpace.load(self.space).to_dict()}))


def load_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                overrides_from_text: bool = False, override_source: str = "command line") -> SupernetConfig:
    """Defaults < hparams (best.json) < file < overrides."""
    hparams = (overrides or {}).get("hparams")
    if hparams is None and file is not None:
        given = read_config_file(file)
        flat = {**given, **{k: v for group in nested_names(SupernetConfig) if isinstance(given.get(group), dict)
                            for k, v in given[group].items()}}
        if not all(k in flat for k in HPARAM_FIELDS):  # a run's config.yaml holds them all: best.json may be gone
            hparams = given.get("hparams")
    base = None
    if hparams not in (None, "", "none", "null"):
        best = read_config_file(hparams)
        base = (str(hparams), {k: best[k] for k in HPARAM_FIELDS if k in best})
    return build_config(SupernetConfig, file, overrides, overrides_from_text, override_source, base=base)


# Research switches measured and taken out of the product (docs/research/README.md), each with the value that
# meant "off": a run saved before they left still loads when it had them off.
REMOVED_FIELDS: dict[str, Any] = {"distill": False, "bn_eval": "recalibrate", "canonical_paths": False,
                                  "few_shot_key": "", "few_shot_epochs": 0, "depth_from": 0}


def read_run_config(run_dir: str | Path) -> SupernetConfig:
    """The config.yaml of a supernet run, including one saved before the research switches left the product."""
    path = Path(run_dir) / "config.yaml"
    values = read_config_file(path)
    for name, off in REMOVED_FIELDS.items():
        if name in values and values[name] != off:
            raise ConfigError(f"{path}: field {name!r}: this run used {values[name]!r}, a research switch no longer "
                              f"in effcifar (docs/research/README.md); expected {off!r} or no {name!r}")
        values.pop(name, None)
    return build_config(SupernetConfig, None, values, override_source=str(path))


def load_supernet(run_dir: str | Path, map_location: str | torch.device = "cpu",
                  ) -> tuple[Supernet, ArchSpace, SupernetConfig]:
    """(trained supernet, its final space, its config) from a finished run directory."""
    run = Path(run_dir)
    path = run / "supernet.pt"
    if not path.exists():
        raise ConfigError(f"{run}: no supernet.pt (is this a finished `effcifar supernet train` run?)")
    try:
        state = read_checkpoint(path, map_location)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    config = read_run_config(run)
    full = ArchSpace.from_dict(state["space"], str(path))
    net = Supernet(full, state["channels"], state["num_classes"], state["logits_weight"])
    net.load_state_dict(state["model"])
    return net, full.restrict(state["choices"]), config
