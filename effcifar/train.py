"""One training run from one config: the cifar10-fast recipe, made configurable.

`train(TrainConfig(...), out_dir)` loads the data onto the device, builds the network, runs SGD
with the piecewise-linear schedule and writes the run directory: `config.yaml`, `logs.tsv`
(one row per epoch), `summary.json` and `model.pt` (the weights with the input normalisation, class
names and architecture: `effcifar.load_model` predicts from it alone).

Three seams keep the loop short and the config about what every run shares:

- a recipe (`Recipe`, registered by name in RECIPES) is the method: network, optimiser step,
  schedule, augmentation, evaluation, and its own fields (`RecipeFields`: resnet9's depths,
  airbench's switches), which live in `TrainConfig.recipe_fields`;
- hooks (`TrainHook`) see the loop before every step and after every epoch, so an experiment
  plugs in (change the LR, freeze a layer, stop early, report progress) instead of adding a field;
- a subnet builder (`register_subnet_builder`) trains a NAS architecture (`TrainConfig.arch`):
  the NAS layer registers it, so that core never names the layers above it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import math
import platform
import random
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import effcifar
from effcifar import memory
from effcifar.allocator import allocator_in_effect
from effcifar.atomic import atomic_torch_save, atomic_write
from effcifar.config import (
    build_from_layers, check_seed, check_threads, check_types, execution, field_error, field_types, nested, read_json, result_values,
    save_config, setting,
)
from effcifar.data import DATASET_NAMES, Augment, CifarData, DeviceLoader, load_dataset
from effcifar.device import (
    PRECISIONS, Autocast, autocast_factory, check_device_name, check_precision, configure_threads, device_name,
    resolve_device, resolve_precision,
)
from effcifar.errors import ConfigError, TrainingDiverged
from effcifar.models import NETWORK_STAGES, NetConfig, ResNet, count_flops, count_parameters
from effcifar.rundir import locked

# Recipes by name, as "module:class" (like entry points): core names a recipe module but never imports
# it at load time; the recipe imports core. resnet9: cifar10-fast (the default); airbench: effcifar.airbench.
RECIPES = {"resnet9": "effcifar.train:Recipe", "airbench": "effcifar.airbench:AirbenchRecipe"}
ARCH_FILE = "arch.json"  # a NAS subnet run's architecture and space, in its run directory
RUN_FILES = ("summary.json", "model.pt", "logs.tsv", ARCH_FILE)  # what a run writes besides config.yaml
MODEL_FORMAT = "effcifar-model/1"  # model.pt: a `model_record`, not a bare state dict
IMAGE_SIDE = 32
SPLIT_SEED = 0  # subset and hold-out splits do not depend on the run's seed, so runs compare on the same images


@dataclass
class DataFields:
    """Which images a run trains and validates on (a part of every stage config that trains)."""

    dataset: str = setting("cifar10", "the dataset", DATASET_NAMES)
    data_dir: str | None = execution(None, "folder or file of the dataset (default: $EFFCIFAR_DATA, then "
                                           "~/.cache/effcifar)")
    subset: int = setting(0, "train on this many training images (0: all)")
    holdout: int = setting(0, "validate on this many held-out training images (0: on the test set, as cifar10-fast)")
    batch_size: int = setting(512, "training images per SGD step")


@dataclass
class AugmentFields:
    """The training batches' augmentation: random crop of the padded image, flip, Cutout."""

    crop_pad: int = setting(4, "pixels of padding around each image before the random 32x32 crop (0: no crop)")
    flip: bool = setting(True, "flip training images left-right at random")
    cutout: int = setting(8, "side in pixels of the square Cutout blanks in each training image (0: none)")


@dataclass
class OptimiserFields:
    """SGD with Nesterov momentum and label smoothing; `peak_lr` is the schedule's top."""

    peak_lr: float = setting(0.4, "the learning rate at the top of the schedule")
    base_wd: float = setting(5e-4, "weight decay")
    momentum: float = setting(0.9, "SGD momentum, in [0, 1)")
    nesterov: bool = setting(True, "Nesterov momentum")
    label_smoothing: float = setting(0.2, "label smoothing of the cross-entropy loss, in [0, 1)")


@dataclass
class WidthFields:
    """The widths of the four stages (the original series' search-space names) and the logits scale."""

    logits_weight: float = setting(0.125, "the logits are multiplied by this before the loss")
    prep: int = setting(64, "channels of the first (prep) convolution")
    layer1: int = setting(128, "channels of stage 1")
    layer2: int = setting(256, "channels of stage 2")
    layer3: int = setting(512, "channels of stage 3")


@dataclass
class ExecutionFields:
    """The seed, and where and how a run computes."""

    seed: int = setting(0, "random seed of weights, batch order and augmentation (not of the subset/holdout split)")
    device: str = execution("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    precision: str = setting("auto", "arithmetic; auto: bf16 on GPUs and AMX CPUs that support it, else fp16 on GPU, "
                                     "fp32 on CPU", PRECISIONS)
    channels_last: bool = setting(True, "channels-last memory layout of images and weights")
    threads: int = execution(0, "CPU threads for torch (0: torch's default)")
    eval_batch_size: int = execution(1024, "images per evaluation batch")


@dataclass
class RecipeFields:
    """The fields of one recipe only (`TrainConfig.recipe_fields`); a subclass declares them with `setting`."""

    EPOCH_FIELDS: ClassVar[tuple[str, ...]] = ()  # fields counted in epochs, scaled with `epochs` (schedule_fields)

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for the first value outside its range; flags need no check."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise field_error(f.name, "an integer >= 0", value)
            if isinstance(value, float) and not value > 0:
                raise field_error(f.name, "a number > 0", value)


@dataclass
class ResNet9Fields(RecipeFields):
    """Recipe resnet9 only: the depth of each stage of the ResNet family (the defaults are cifar10-fast's ResNet-9)."""

    res_prep: int = setting(0, "residual blocks in the prep stage")
    res_layer1: int = setting(1, "residual blocks in stage 1 (after its conv and pooling)")
    res_layer2: int = setting(0, "residual blocks in stage 2 (after its conv and pooling)")
    res_layer3: int = setting(1, "residual blocks in stage 3 (after its conv and pooling)")
    extra_prep: int = setting(0, "extra conv-BN-ReLU layers in the prep stage (after the residual blocks)")
    extra_layer1: int = setting(0, "extra conv-BN-ReLU layers in stage 1 (after the residual blocks)")
    extra_layer2: int = setting(0, "extra conv-BN-ReLU layers in stage 2 (after the residual blocks)")
    extra_layer3: int = setting(0, "extra conv-BN-ReLU layers in stage 3 (after the residual blocks)")


# A dataclass lists its bases' fields from the last base to the first: data first, execution last.
@dataclass
class TrainConfig(ExecutionFields, WidthFields, OptimiserFields, AugmentFields, DataFields):
    """Everything one run depends on. The defaults are cifar10-fast's ResNet-9 recipe (24 epochs).

    The learning rate follows cifar10-fast: it rises linearly from 0 to `peak_lr` at `peak_epoch`
    and falls linearly to 0 at `epochs`, updated every step. `peak_epoch` left out (None) is the
    recipe's share of the run (resnet9: 5/24 of `epochs`, as cifar10-fast's 5 of 24), so
    `TrainConfig(epochs=4)` and `effcifar train --epochs 4` give the same schedule; a layered
    config (file < options) that sets `epochs` alone also scales a `peak_epoch` set below it
    (`SCHEDULE`). cifar10-fast sums the loss over the batch, divides the LR by the batch size and
    multiplies the weight decay by it; that is the same update as the mean loss with LR `peak_lr`
    and weight decay `base_wd`, which we compute.

    `recipe` picks the method. `recipe: airbench` (effcifar.airbench) changes the defaults of the
    shared fields it tunes (batch 1024, 10 epochs, its LR, widths, ...; see `recipe_defaults`):
    fields a user sets in a file or on the command line win, the rest take the recipe's values.
    Build such configs with `build_config` or `TrainConfig.for_recipe`; `TrainConfig(recipe=
    "airbench")` alone keeps the resnet9 values of the shared fields. A recipe's own fields
    (resnet9: the stage depths res_*/extra_*; airbench: the switches of its published methods)
    are `recipe_fields`, an instance of the recipe's `RecipeFields` class (a mapping is converted):
    files, options and search spaces give them flat (`whiten: false`), accepted with that recipe
    only; a saved config nests them under `recipe_fields`, which a file may do too.

    `arch` trains a NAS subnet instead of the ResNet (recipe resnet9 only): the standalone
    network of an architecture file (`arch/top_K.json`, `architecture_final.json` or a plain NNI
    `{key: choice}`) in the space `space`, with the widths prep/layer1..3 and `logits_weight`
    (res_*/extra_* do not apply). A file that embeds its space (`"space": {...}`, as
    `effcifar search` writes them) is built in that space and `space` is ignored. The NAS layer
    registers what reads and builds them (`register_subnet_builder`).
    """

    RENAMED_FIELDS: ClassVar[dict[str, str]] = {"total_epoch": "epochs"}  # old key -> field, accepted with a notice

    recipe: str = setting("resnet9", "the training method; airbench changes the defaults of the fields it tunes",
                          tuple(RECIPES))
    arch: str | None = setting(None, "architecture file of a NAS subnet to train instead of the ResNet (resnet9 only)")
    space: str = setting("seed", "the space `arch` belongs to (a built-in name or a space file), unless the file "
                                 "embeds one")
    epochs: int = setting(24, "epochs of the run; the learning rate falls linearly to 0 at the end")
    peak_epoch: float | None = setting(None, "epoch at which the learning rate peaks (it rises linearly from 0 to "
                                             "there); default (none): the recipe's share of the run (resnet9: 5/24 "
                                             "of epochs, airbench: 0.23)")
    compile: bool = execution(False, "compile the network with torch.compile (faster steps after a slow start)")
    tta: bool = setting(False, "average the logits of each test image and its mirror image")
    recipe_fields: RecipeFields | None = nested("the recipe's own fields (resnet9: res_*/extra_*; airbench: its "
                                                "switches); none: the recipe's defaults")

    def __post_init__(self) -> None:
        """Make `recipe_fields` the recipe's RecipeFields (from a mapping or None) and resolve `peak_epoch` (None)."""
        if self.recipe not in RECIPES:
            return  # validate() names the field
        recipe = recipe_class(self.recipe)
        if self.recipe_fields is None or isinstance(self.recipe_fields, Mapping):
            given = dict(self.recipe_fields or {})
            own = {f.name for f in dataclasses.fields(recipe.fields_class)}
            stray = next((key for key in given if key not in own), None)
            if stray is not None:
                owner = next((name for name, cls in recipe_fields_classes().items()
                              if stray in {f.name for f in dataclasses.fields(cls)}), None)
                raise field_error(stray, f"no value with recipe {self.recipe}" + (
                    f" (a field of recipe {owner})" if owner else " (not a field of any recipe)"), given[stray])
            self.recipe_fields = recipe.fields_class(**given)
        if self.peak_epoch is None and isinstance(self.epochs, int):
            self.peak_epoch = float(f"{recipe.peak_share * self.epochs:.12g}")

    @classmethod
    def recipe_defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Field values that the recipe named in `values` puts in place of the resnet9 defaults, and its own fields'
        defaults (flat)."""
        name = values.get("recipe", "resnet9")
        if name not in RECIPES:
            return {}
        recipe = recipe_class(name)
        return {**asdict(recipe.fields_class()), **recipe.defaults(values)}

    @classmethod
    def schedule_fields(cls) -> dict[str, tuple[str, ...]]:
        """The fields counted in epochs of the run: a layer (file, option) that sets `epochs` alone scales them."""
        own = tuple(name for fields_class in recipe_fields_classes().values() for name in fields_class.EPOCH_FIELDS)
        return {"epochs": ("peak_epoch", *own)}

    @classmethod
    def extra_field_types(cls) -> dict[str, Any]:
        """The keys a file or option may give besides the fields: every recipe's own fields (flat) and old names."""
        types_ = {name: kind for fields_class in recipe_fields_classes().values()
                  for name, kind in field_types(fields_class).items()}
        hints = typing.get_type_hints(cls)
        return {**types_, **{old: hints[new] for old, new in cls.RENAMED_FIELDS.items()}}

    @classmethod
    def for_recipe(cls, recipe: str = "resnet9", **fields: Any) -> "TrainConfig":
        """A checked config of `recipe` with its defaults, where the given `fields` (its own ones flat) win."""
        return build_from_layers(cls, [("TrainConfig.for_recipe", {"recipe": recipe, **fields}, False)])

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for the first value outside its range."""
        check_types(self)
        check_seed("seed", self.seed)
        if self.recipe not in RECIPES:
            raise field_error("recipe", f"one of {', '.join(RECIPES)}", self.recipe)
        if self.dataset not in DATASET_NAMES:
            raise field_error("dataset", f"one of {', '.join(DATASET_NAMES)}", self.dataset)
        for name in ["batch_size", "epochs", "eval_batch_size", *NETWORK_STAGES]:
            if getattr(self, name) <= 0:
                raise field_error(name, "a positive integer", getattr(self, name))
        for name in ("subset", "holdout", "crop_pad"):
            if getattr(self, name) < 0:
                raise field_error(name, "an integer >= 0", getattr(self, name))
        check_threads("threads", self.threads)
        if not 0 <= self.cutout <= 32:
            raise field_error("cutout", "an integer in [0, 32]", self.cutout)
        if self.crop_pad > 16:
            raise field_error("crop_pad", "an integer in [0, 16]", self.crop_pad)
        if not 0 <= self.peak_epoch <= self.epochs:
            raise field_error("peak_epoch", f"a number in [0, epochs={self.epochs}]", self.peak_epoch)
        for name in ("peak_lr", "logits_weight"):
            if not getattr(self, name) > 0:
                raise field_error(name, "a number > 0", getattr(self, name))
        if not self.base_wd >= 0:
            raise field_error("base_wd", "a number >= 0", self.base_wd)
        if not 0 <= self.momentum < 1:
            raise field_error("momentum", "a number in [0, 1)", self.momentum)
        if not 0 <= self.label_smoothing < 1:
            raise field_error("label_smoothing", "a number in [0, 1)", self.label_smoothing)
        check_precision(self.precision)
        check_device_name(self.device)  # whether the machine has that GPU is asked where the run starts
        fields_class = recipe_class(self.recipe).fields_class
        if type(self.recipe_fields) is not fields_class:
            raise field_error("recipe_fields", f"{fields_class.__name__} for recipe {self.recipe}", self.recipe_fields)
        self.recipe_fields.validate()
        if self.arch is not None:
            if self.recipe != "resnet9":
                raise field_error("arch", f"none with recipe {self.recipe} (a NAS subnet trains with resnet9)",
                                  self.arch)
            self.architecture()

    def architecture(self) -> tuple[Any, dict[str, str]]:
        """(space, architecture) of `arch`; a ConfigError with field 'arch' names the file and the problem."""
        try:
            return subnet_builder().read(str(self.arch), self.space)
        except ConfigError as e:
            err = ConfigError(f"field 'arch': {e}")
            err.field = "arch"  # type: ignore[attr-defined]
            raise err from None

    def widths(self) -> dict[str, int]:
        """The width of each stage of the network (prep, layer1..3)."""
        return {s: getattr(self, s) for s in NETWORK_STAGES}


@dataclass(frozen=True)
class SubnetBuilder:
    """What trains a NAS subnet (`TrainConfig.arch`); the NAS layer registers one with `register_subnet_builder`.

    `read(arch_file, space)` gives (space, architecture), a ConfigError naming the file if it is bad;
    the space has `to_dict()` (kept in the run's arch.json). `build(space, architecture, widths,
    num_classes, logits_weight)` gives the standalone network, on CPU.
    """

    read: Callable[[str, str], tuple[Any, dict[str, str]]]
    build: Callable[[Any, Mapping[str, str], Mapping[str, int], int, float], nn.Module]


_subnet_builders: list[SubnetBuilder] = []


def register_subnet_builder(builder: SubnetBuilder) -> None:
    """Make `builder` the one that reads and builds `arch` files (the NAS package does this on import)."""
    _subnet_builders[:] = [builder]


def subnet_builder() -> SubnetBuilder:
    """The registered SubnetBuilder; a ConfigError (field 'arch') when none is."""
    if not _subnet_builders:
        raise ConfigError("no subnet builder is registered (the NAS package registers one when it is imported)")
    return _subnet_builders[0]


@dataclass
class EpochMetrics:
    """One row of logs.tsv. Times in seconds; train_time excludes evaluation (as DAWNBench)."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    valid_loss: float
    valid_acc: float
    epoch_time: float
    train_time: float
    total_time: float


EpochCallback = Callable[[EpochMetrics], "bool | None"]  # return True to stop the run after this epoch
StepHook = Callable[[int, int], None]  # (steps done, total steps), for progress bars


@dataclass
class TrainResult:
    """What a run produced; `summary` is what summary.json holds."""

    model: nn.Module
    history: list[EpochMetrics]
    summary: dict[str, Any]
    out_dir: Path | None = None
    stopped_early: bool = field(default=False)


def lr_at(config: TrainConfig, epoch: float) -> float:
    """Piecewise-linear schedule 0 -> peak_lr at peak_epoch -> 0 at epochs."""
    return float(np.interp(epoch, [0, config.peak_epoch, config.epochs], [0, config.peak_lr, 0]))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (model init); the data order has its own generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_sizes(data: CifarData, subset: int, holdout: int) -> tuple[int, int]:
    """(training images, evaluation images: held-out and test) of a split.

    ConfigError if holdout or subset ask for more training images than the dataset has.
    """
    n = len(data.y_train)
    if holdout >= n:
        raise field_error("holdout", f"fewer than the {n} training images of {data.name}", holdout)
    if subset > n - holdout:
        raise field_error("subset", f"at most the {n - holdout} training images of {data.name} left after "
                          f"holdout={holdout}", subset)
    return subset or n - holdout, holdout + len(data.y_test)


def check_memory(config: TrainConfig, data: CifarData, device: torch.device, precision: str,
                 build: Callable[[], nn.Module]) -> None:
    """Refuse a run whose network `build()` and data cannot fit on the device, before anything is allocated."""
    n_train, n_eval = split_sizes(data, config.subset, config.holdout)
    check_batch_size(config.batch_size, n_train)  # a plainer reason than the memory a too-large batch would need
    data_bytes = (n_train + n_eval) * (3 * IMAGE_SIDE * IMAGE_SIDE + 8)  # uint8 as loaded (no padded copy), int64 labels
    need = memory.estimate(build, config.batch_size, config.eval_batch_size, data_bytes,
                           activation_bytes=2 if precision in ("bf16", "fp16") else 4)
    memory.check(need, device, "the widths (prep, layer1..3), batch_size, eval_batch_size or subset")


def check_batch_size(batch_size: int, train_images: int) -> None:
    """ConfigError (field 'batch_size') for a batch larger than the training images: no step could be taken."""
    if batch_size > train_images:
        raise field_error("batch_size", f"at most the number of training images ({train_images})", batch_size)


def split_data(data: CifarData, subset: int, holdout: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_valid, y_valid): optional subset and hold-out from a fixed shuffle; else valid = test."""
    n = len(data.y_train)
    split_sizes(data, subset, holdout)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    valid_idx = order[n - holdout:] if holdout else None
    train_idx = order[: n - holdout]
    if subset:
        train_idx = train_idx[:subset]
    train_idx = np.sort(train_idx) if len(train_idx) < n else slice(None)  # all of it: the arrays, not a copy
    if valid_idx is None:
        return data.x_train[train_idx], data.y_train[train_idx], data.x_test, data.y_test
    valid_idx = np.sort(valid_idx)
    return data.x_train[train_idx], data.y_train[train_idx], data.x_train[valid_idx], data.y_train[valid_idx]


def device_loaders(config: TrainConfig, data: CifarData, device: torch.device,
                   augment: Augment | None = None) -> tuple[DeviceLoader, DeviceLoader]:
    """(training loader with `augment` (default: the config's crop/flip/Cutout), validation loader) on the device."""
    x_train, y_train, x_valid, y_valid = split_data(data, config.subset, config.holdout)
    check_batch_size(config.batch_size, len(y_train))
    mean, std = data.mean_std()
    common = dict(mean=mean, std=std, device=device, channels_last=config.channels_last)
    train_loader = DeviceLoader(
        x_train, y_train, batch_size=config.batch_size, shuffle=True, drop_last=True, seed=config.seed,
        augment=augment or Augment(crop_pad=config.crop_pad, flip=config.flip, cutout=config.cutout), **common,
    )
    return train_loader, DeviceLoader(x_valid, y_valid, batch_size=config.eval_batch_size, **common)


# Where torch has a fused SGD kernel (torch >= 2.4); for fp32 weights only: on CPU (torch 2.13) it leaves fp16 and
# bf16 tensors unchanged but for their last few elements (the vectorised part is never written).
FUSED_SGD_DEVICES = ("cpu", "cuda")


class TrainStep:
    """One SGD step of the recipe: forward under autocast, label-smoothed loss, backward, update.

    Mixed precision: bf16 autocast needs no loss scaling; fp16 uses a GradScaler. With
    `config.compile` the forward/backward runs through torch.compile. With `fused` the SGD update
    is torch's fused kernel (on CPU and GPU): one kernel for all tensors, and with fp16 the
    GradScaler's overflow check stays on the device (the unfused step reads it back every step, a
    sync). A supernet turns it off: its paths give different parameters gradients from step to
    step, and the fused kernel cannot start one parameter's momentum while others have theirs.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, precision: str,
                 param_groups: list[dict[str, Any]] | None = None, before_update: Callable[[], None] | None = None,
                 fused: bool = True):
        self.model = model
        self.before_update = before_update  # runs between backward and the optimiser step
        self.model_to_run = torch.compile(model) if config.compile else model
        self.label_smoothing = config.label_smoothing
        self.device_type = next(model.parameters()).device.type
        self.autocast: Autocast = autocast_factory(self.device_type, precision)  # the run's precision (fp32: none)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")
        self.optimizer = torch.optim.SGD(  # a group's "lr_scale" multiplies the scheduled LR
            param_groups or model.parameters(), lr=0.0, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.base_wd, fused=fused and self.device_type in FUSED_SGD_DEVICES and all(
                p.dtype == torch.float32 for p in model.parameters()),  # see FUSED_SGD_DEVICES
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the weights on one batch at learning rate `lr`; return (loss, logits), detached."""
        loss, logits = self.backward(x, y)
        self.update(lr)
        return loss, logits

    def backward(self, x: torch.Tensor, y: torch.Tensor, soft_targets: torch.Tensor | None = None,
                 weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward on one batch, adding `weight` x its gradients; return (loss, logits), detached.

        Separate from `update`, so that a step can combine the gradients of several passes (e.g.
        paths; a weight of 1/passes averages them). With `soft_targets` (class probabilities, e.g.
        a teacher's) the loss is their cross-entropy instead of the label-smoothed one against `y`.
        """
        with self.autocast():
            logits = self.model_to_run(x)
            if soft_targets is None:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
            else:
                loss = F.cross_entropy(logits.float(), soft_targets)
        self.scaler.scale(loss * weight).backward()
        return loss.detach(), logits.detach()

    def update(self, lr: float) -> None:
        """One optimiser step with the gradients so far at learning rate `lr`, then clear them."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.before_update is not None:
            self.before_update()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


Predict = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, batch) -> logits, e.g. with TTA


def plain_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits, no TTA."""
    return model(x)


def mirror_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean logits of each image and its mirror image (flip TTA)."""
    return (model(x) + model(x.flip(3))) / 2


def evaluate(
    model: nn.Module, loader: DeviceLoader, autocast: Any, label_smoothing: float, tta: bool,
    predict: Predict | None = None, *, one_shape: bool = False,
) -> tuple[float, float]:
    """(mean loss, accuracy) on a loader; with tta, logits of the image and its mirror are averaged.

    `predict`, if given, replaces the model call and `tta` (the airbench recipe's multi-crop TTA).
    `one_shape` pads a short last batch with zero images and drops their logits, so that a compiled
    model sees a single input shape and is not compiled again for the remainder (the network is in
    eval mode, so the padding changes no other image's logits).
    """
    if predict is None:
        predict = mirror_logits if tta else plain_logits
    model.eval()
    loss_sum = torch.zeros((), device=loader.labels.device)
    correct = torch.zeros((), device=loader.labels.device, dtype=torch.long)
    with torch.inference_mode(), autocast():
        for x, y in loader:
            short = loader.batch_size - len(y) if one_shape else 0
            logits = predict(model, F.pad(x, (0, 0, 0, 0, 0, 0, 0, short)) if short else x)[:len(y)]
            loss_sum += F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    n = len(loader.labels)
    return loss_sum.item() / n, correct.item() / n


def library_versions() -> dict[str, str]:
    """Versions that a result depends on, for summary.json."""
    return {
        "effcifar": effcifar.__version__, "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__,
    }


def write_tsv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rewrite a tab-separated table atomically (columns of the first row; floats to 6 digits)."""
    names = list(rows[0])
    lines = ["\t".join(names)]
    for row in rows:
        lines.append("\t".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k]) for k in names))
    atomic_write(path, "\n".join(lines) + "\n")


def write_logs(path: Path, history: Sequence[EpochMetrics]) -> None:
    """Rewrite logs.tsv atomically with every epoch so far."""
    write_tsv(path, [asdict(m) for m in history])


def read_logs(path: Path) -> list[EpochMetrics]:
    """The epochs of a logs.tsv written by `write_logs`."""
    lines = path.read_text().splitlines()
    names = lines[0].split("\t")
    kinds = {f.name: int if f.type in (int, "int") else float for f in dataclasses.fields(EpochMetrics)}
    return [EpochMetrics(**{n: kinds[n](v) for n, v in zip(names, line.split("\t"))}) for line in lines[1:]]


def finished_summary(run_dir: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The summary.json of a run that finished in `run_dir` with `config`; None if no run finished there.

    ConfigError if one finished with another config, naming the fields that differ.
    """
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = read_json(path, "run summary")
    done = result_values(build_from_layers(TrainConfig, [(str(path), summary["config"], False)]))
    wanted = result_values(config)
    changed = sorted(k for k in wanted if done.get(k) != wanted[k])  # values compare as numbers (1 is 1.0)
    if changed:
        raise ConfigError(f"{run_dir}: finished with another config ({', '.join(changed)} differ); "
                          f"use the same options or another --out")
    if config.arch is not None:  # the file's path is the same, but it may hold another network now
        space, arch = config.architecture()
        recorded = read_json(run_dir / ARCH_FILE, "run architecture") if (run_dir / ARCH_FILE).is_file() else {}
        if recorded.get("arch") != arch or recorded.get("space") != space.to_dict():
            raise ConfigError(f"{run_dir}: finished with another architecture than {config.arch} holds now; "
                              f"train into another --out")
    return summary


class Recipe:
    """The parts of a run that differ between recipes; this base class is the resnet9 recipe (cifar10-fast).

    `train()` runs one loop for every recipe and asks its recipe for the network, the optimiser
    step, the LR, the augmentation and the evaluation, and lets it act at the start of each epoch,
    after each step and at the end of training. effcifar.airbench.AirbenchRecipe overrides them.
    `fields_class` holds the recipe's own fields; `peak_share` is the share of the run at which
    the LR peaks when `peak_epoch` is left out.
    """

    fields_class: ClassVar[type[RecipeFields]] = ResNet9Fields
    peak_share: ClassVar[float] = 5 / 24

    def __init__(self, config: TrainConfig):
        self.config = config

    @classmethod
    def defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Shared fields' values this recipe puts in place of the resnet9 defaults (given the values set so far)."""
        return {}

    def augment(self) -> Augment:
        """The training loader's per-batch augmentation."""
        c = self.config
        return Augment(crop_pad=c.crop_pad, flip=c.flip, cutout=c.cutout)

    def build_model(self, num_classes: int, train_loader: DeviceLoader | None = None) -> nn.Module:
        """The network, on CPU; `train_loader` gives data-dependent initialisations their images."""
        c = self.config
        if c.arch is not None:  # a NAS subnet: only the chosen ops of its space
            space, arch = c.architecture()
            return subnet_builder().build(space, arch, c.widths(), num_classes, c.logits_weight)
        depths = c.recipe_fields
        return ResNet(NetConfig(
            channels=c.widths(), res_layers={s: getattr(depths, f"res_{s}") for s in NETWORK_STAGES},
            extra_layers={s: getattr(depths, f"extra_{s}") for s in NETWORK_STAGES},
            logits_weight=c.logits_weight, num_classes=num_classes,
        ))

    def train_step(self, model: nn.Module, precision: str) -> TrainStep:
        """The optimiser step."""
        return TrainStep(model, self.config, precision)

    def lr(self, epoch: float) -> float:
        """The learning rate at a (fractional) epoch."""
        return lr_at(self.config, epoch)

    def start_epoch(self, epoch: int, model: nn.Module, train_loader: DeviceLoader) -> None:
        """Called before the steps of each epoch (numbered from 1)."""

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimiser step (numbered from 1)."""

    def finish(self, model: nn.Module) -> None:
        """Called once after the last step, before the last evaluation."""

    def evaluate(self, model: nn.Module, loader: DeviceLoader, autocast: Autocast, final: bool) -> tuple[float, float]:
        """(mean loss, accuracy) on a loader; `final` marks the evaluation after the last epoch."""
        return evaluate(model, loader, autocast, self.config.label_smoothing, self.config.tta,
                        one_shape=self.config.compile)

    def test_tta(self) -> str | None:
        """The test-time augmentation of the final evaluation, in words (None: none), for summaries."""
        return "flip" if self.config.tta else None


def recipe_class(name: str) -> type[Recipe]:
    """The Recipe class registered as `name` in RECIPES, imported on first use."""
    module, _, attribute = RECIPES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def recipe_fields_classes() -> dict[str, type[RecipeFields]]:
    """Each recipe's own fields class, by recipe name."""
    return {name: recipe_class(name).fields_class for name in RECIPES}


def recipe_for(config: TrainConfig) -> Recipe:
    """The Recipe object of `config.recipe`."""
    return recipe_class(config.recipe)(config)


@dataclass
class Loop:
    """A run in progress, as hooks see it: what it trains, with what, and where it stands.

    A hook may change `lr` in `before_step` (the step uses it) and read everything else.
    """

    config: TrainConfig
    recipe: Recipe
    model: nn.Module
    step_fn: TrainStep
    train_loader: DeviceLoader
    valid_loader: DeviceLoader
    test_loader: DeviceLoader
    device: torch.device
    precision: str
    dataset: dict[str, Any]  # name, source, classes
    mean: tuple[float, ...]  # the input normalisation (per channel, 0..255 units) and the class names: model.pt's
    std: tuple[float, ...]
    classes: list[str]
    params: int  # trainable parameters and forward FLOPs per image, counted before training
    flops: int
    start: float  # time.perf_counter() at the run's start
    epoch: int = 0  # the epoch in progress, from 1
    steps_done: int = 0
    lr: float = 0.0  # of the step about to run (before_step), else of the last step
    train_time: float = 0.0  # seconds spent in training steps so far (without evaluation)

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch."""
        return len(self.train_loader)

    @property
    def total_steps(self) -> int:
        """Optimiser steps in the whole run."""
        return self.steps_per_epoch * self.config.epochs


class TrainHook:
    """A plug-in of the training loop; override what an experiment needs (here every call does nothing).

    Hooks run in the order given to `train`: `before_step` after the recipe has set the step's LR,
    `after_step` after the step (and the recipe's own), `after_epoch` with each epoch's metrics once
    they are logged; True from any hook's `after_epoch` stops the run after that epoch.
    """

    def before_step(self, loop: Loop) -> None:
        """Called before each optimiser step; `loop.lr` is the step's LR and may be changed."""

    def after_step(self, loop: Loop) -> None:
        """Called after each optimiser step; `loop.steps_done` counts it."""

    def after_epoch(self, loop: Loop, metrics: EpochMetrics) -> bool | None:
        """Called after each epoch's evaluation; return True to stop the run here."""
        return None


class EpochCallbackHook(TrainHook):
    """A plain `callback(metrics) -> stop?` as a hook (HPO pruning, progress lines)."""

    def __init__(self, callback: EpochCallback):
        self.callback = callback

    def after_epoch(self, loop: Loop, metrics: EpochMetrics) -> bool | None:
        return bool(self.callback(metrics))


class ProgressHook(TrainHook):
    """`on_step(steps done, total steps)` after every step, for progress bars."""

    def __init__(self, on_step: StepHook):
        self.on_step = on_step

    def after_step(self, loop: Loop) -> None:
        self.on_step(loop.steps_done, loop.total_steps)


def train(
    config: TrainConfig, out_dir: str | Path | None = None, *, callbacks: Sequence[EpochCallback] = (),
    on_step: StepHook | None = None, hooks: Sequence[TrainHook] = (), data: CifarData | None = None,
) -> TrainResult:
    """Run one training run; write the run directory if `out_dir` is given.

    `data` lets a caller that runs many trials load the dataset once. Each callback receives
    the metrics of every epoch; if one returns True the run stops after that epoch. `on_step`
    reports progress; `hooks` plug into the loop (`TrainHook`). The run directory is locked
    while the run writes it (`effcifar.rundir`).
    """
    config.validate()
    out = Path(out_dir) if out_dir is not None else None
    every_hook = [*hooks, *map(EpochCallbackHook, callbacks), *([ProgressHook(on_step)] if on_step else [])]
    with locked(out, "train") if out is not None else contextlib.nullcontext():
        return run_training(config, out, every_hook, data)


def run_training(config: TrainConfig, out: Path | None, hooks: Sequence[TrainHook],
                 data: CifarData | None) -> TrainResult:
    """The body of `train`, with its run directory (if any) locked: set up, one epoch at a time, sum up."""
    loop = start_loop(config, data)
    if out is not None:
        write_run_config(config, out)
    history: list[EpochMetrics] = []
    stopped_early = False
    while loop.epoch < config.epochs:
        metrics = train_epoch(loop, hooks)
        history.append(metrics)
        if out is not None:
            write_logs(out / "logs.tsv", history)
        if not math.isfinite(metrics.train_loss):
            raise TrainingDiverged(f"train loss is {metrics.train_loss} at epoch {loop.epoch} "
                                   f"(peak_lr {config.peak_lr})")
        if any([bool(hook.after_epoch(loop, metrics)) for hook in hooks]) and loop.epoch < config.epochs:
            stopped_early = True
            break
    summary = run_summary(loop, history, stopped_early)
    if out is not None:
        atomic_torch_save(model_record(loop.model, config, loop.mean, loop.std, loop.classes), out / "model.pt")
        atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return TrainResult(model=loop.model, history=history, summary=summary, out_dir=out, stopped_early=stopped_early)


def start_loop(config: TrainConfig, data: CifarData | None) -> Loop:
    """Device, precision, data on the device, the seeded network and its optimiser step: a loop at epoch 0."""
    start = time.perf_counter()
    device = resolve_device(config.device)
    configure_threads(config.threads, device)
    precision = resolve_precision(config.precision, device)
    data = data if data is not None else load_dataset(config.dataset, config.data_dir)
    recipe = recipe_for(config)
    check_memory(config, data, device, precision, functools.partial(recipe.build_model, data.num_classes))
    train_loader, valid_loader = device_loaders(config, data, device, recipe.augment())
    test_loader = valid_loader
    mean, std = data.mean_std()
    if config.holdout:
        test_loader = DeviceLoader(data.x_test, data.y_test, batch_size=config.eval_batch_size, mean=mean, std=std,
                                   device=device, channels_last=config.channels_last)
    seed_everything(config.seed)
    model = recipe.build_model(data.num_classes, train_loader).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dataset = {"name": data.name, "source": data.source, "num_classes": data.num_classes}
    return Loop(config, recipe, model, recipe.train_step(model, precision), train_loader, valid_loader, test_loader,
                device, precision, dataset, tuple(mean), tuple(std), list(data.classes), count_parameters(model),
                count_flops(model), start)


def write_run_config(config: TrainConfig, out: Path) -> None:
    """config.yaml, and for a NAS subnet its architecture and space (arch.json), wherever its file was.

    They replace the files of an earlier run in `out`, so that a run that fails leaves an unfinished run
    (no summary), never its config beside another run's model and summary.
    """
    record = None
    if config.arch is not None:  # read before an old arch.json in `out` goes: it may be the file named
        space, arch = config.architecture()
        record = {"arch": arch, "space": space.to_dict(), "source": config.arch}
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    save_config(config, out / "config.yaml")
    if record is not None:
        atomic_write(out / ARCH_FILE, json.dumps(record, indent=2) + "\n")


def train_epoch(loop: Loop, hooks: Sequence[TrainHook]) -> EpochMetrics:
    """One epoch: the recipe's epoch start, every step (with the hooks before and after it), the recipe's finish
    after the last step, then the evaluation."""
    loop.epoch += 1
    recipe, model, step_fn = loop.recipe, loop.model, loop.step_fn
    step_fn.model_to_run.train()
    epoch_start = time.perf_counter()
    recipe.start_epoch(loop.epoch, model, loop.train_loader)
    loss_sum = torch.zeros((), device=loop.device)
    correct = torch.zeros((), device=loop.device, dtype=torch.long)
    for x, y in loop.train_loader:
        loop.lr = recipe.lr(loop.steps_done / loop.steps_per_epoch)
        for hook in hooks:
            hook.before_step(loop)
        loss, logits = step_fn(x, y, loop.lr)
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        loop.steps_done += 1
        recipe.after_step(model, loop.steps_done, loop.total_steps)
        for hook in hooks:
            hook.after_step(loop)
    last = loop.epoch == loop.config.epochs
    if last:
        recipe.finish(model)
    if loop.device.type == "cuda":
        torch.cuda.synchronize(loop.device)
    epoch_time = time.perf_counter() - epoch_start
    loop.train_time += epoch_time
    valid_loss, valid_acc = recipe.evaluate(step_fn.model_to_run, loop.valid_loader, step_fn.autocast, last)
    seen = loop.steps_per_epoch * loop.config.batch_size
    return EpochMetrics(epoch=loop.epoch, lr=loop.lr, train_loss=loss_sum.item() / seen,
                        train_acc=correct.item() / seen, valid_loss=valid_loss, valid_acc=valid_acc,
                        epoch_time=epoch_time, train_time=loop.train_time,
                        total_time=time.perf_counter() - loop.start)


def run_summary(loop: Loop, history: Sequence[EpochMetrics], stopped_early: bool) -> dict[str, Any]:
    """What summary.json holds: the config, the data, the accuracies, the times, the costs and the machine."""
    config, step_fn = loop.config, loop.step_fn
    test_acc = history[-1].valid_acc
    if config.holdout:
        test_acc = loop.recipe.evaluate(step_fn.model_to_run, loop.test_loader, step_fn.autocast, True)[1]
    return {
        "config": asdict(config),
        "dataset": {**loop.dataset,
                    "train_images": len(loop.train_loader.labels), "valid_images": len(loop.valid_loader.labels),
                    "test_images": len(loop.test_loader.labels),
                    "valid_split": "holdout" if config.holdout else "test"},
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "final_valid_acc": history[-1].valid_acc,
        "best_valid_acc": max(m.valid_acc for m in history),
        "test_acc": test_acc,
        "test_tta": loop.recipe.test_tta(),
        "train_time": loop.train_time,
        "total_time": time.perf_counter() - loop.start,
        "params": loop.params,
        "flops": loop.flops,
        "device": device_name(loop.device),
        "precision": loop.precision,
        "malloc": allocator_in_effect(),
        "seed": config.seed,
        "versions": library_versions(),
    }


def model_record(model: nn.Module, config: TrainConfig, mean: Sequence[float], std: Sequence[float],
                 classes: Sequence[str]) -> dict[str, Any]:
    """What model.pt holds: the weights and all a prediction needs without the dataset (`effcifar.load_model`):
    the input normalisation (per-channel mean and std in 0..255 units), the class names, the config and, for a
    NAS subnet, its architecture and space. Plain data and tensors only, so `torch.load(weights_only=True)` reads
    it."""
    record = {"format": MODEL_FORMAT, "state_dict": model.state_dict(), "mean": [float(v) for v in mean],
              "std": [float(v) for v in std], "classes": [str(c) for c in classes],
              "config": {**asdict(config), "arch": None}}  # the architecture itself, not its file's path, below
    if config.arch is not None:
        space, arch = config.architecture()
        record["arch"] = {"arch": dict(arch), "space": space.to_dict()}
    return record
