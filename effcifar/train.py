"""One training run from one config: the cifar10-fast recipe, made configurable.

`train(TrainConfig(...), out_dir)` loads the data onto the device, builds the network, runs SGD
with the piecewise-linear schedule and writes the run directory: `config.yaml`, `logs.tsv`
(one row per epoch), `summary.json` and `model.pt` (the weights with the input normalisation, class
names and architecture: `effcifar.load_model` predicts from it alone). Callbacks see each epoch's
metrics and may stop the run (hyper-parameter search prunes through them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import effcifar
from effcifar import memory
from effcifar.allocator import allocator_in_effect
from effcifar.atomic import atomic_torch_save, atomic_write
from effcifar.config import build_from_layers, check_seed, execution, field_error, save_config, setting
from effcifar.errors import ConfigError, TrainingDiverged
from effcifar.data import DATASET_NAMES, Augment, CifarData, DeviceLoader, load_dataset
from effcifar.models import STAGES, NetConfig, ResNet, count_flops, count_parameters
from effcifar.rundir import locked

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Recipes by name, as "module:class" (like entry points): core names a recipe module but never imports
# it; the recipe imports core. resnet9: cifar10-fast (the default); airbench: effcifar.airbench.
RECIPES = {"resnet9": "effcifar.train:Recipe", "airbench": "effcifar.airbench:AirbenchRecipe"}
# `arch` files are read and built by the NAS layer above core, named the same way.
ARCH_FILE_READER = "effcifar.nas.space:load_arch_file"
SUBNET_BUILDER = "effcifar.nas.space:build_standalone"
ARCH_FILE = "arch.json"  # a NAS subnet run's architecture and space, in its run directory
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
    """The widths of the four stages (the seed's search-space names) and the logits scale."""

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
class AirbenchFields:
    """Recipe airbench only: each switch turns one published method off, for ablations."""

    whiten: bool = setting(True, "airbench: first conv = frozen 2x2 patch-whitening filters from training-set "
                                 "statistics")
    whiten_bias_epochs: int = setting(3, "airbench: the whitening conv's bias trains for this many epochs, then "
                                         "freezes")
    identity_init: bool = setting(True, "airbench: 3x3 convs start as identity (dirac) on their first input channels")
    lookahead: bool = setting(True, "airbench: every 5 steps pull the weights toward their slow average; end on the "
                                    "average")
    alt_flip: bool = setting(True, "airbench: flip every image on alternate epochs (random in the first) instead of "
                                   "at random")
    multicrop_tta: bool = setting(True, "airbench: with tta, also average the mirror pairs of two 1-pixel "
                                        "translations")
    bn_bias_lr: float = setting(64.0, "airbench: LR multiplier of the BatchNorm biases (their weight decay is "
                                      "divided by it); 1: off")


# A dataclass lists its bases' fields from the last base to the first: data first, airbench last.
@dataclass
class TrainConfig(AirbenchFields, ExecutionFields, WidthFields, OptimiserFields, AugmentFields, DataFields):
    """Everything one run depends on. The defaults are cifar10-fast's ResNet-9 recipe (24 epochs).

    The learning rate follows cifar10-fast: it rises linearly from 0 to `peak_lr` at `peak_epoch`
    and falls linearly to 0 at `total_epoch`, updated every step. cifar10-fast sums the loss over
    the batch, divides the LR by the batch size and multiplies the weight decay by it; that is the
    same update as the mean loss with LR `peak_lr` and weight decay `base_wd`, which we compute.

    `recipe` picks the method. `recipe: airbench` (effcifar.airbench) changes the defaults of the
    fields it tunes (batch 1024, 10 epochs, its LR, widths, ...; see `recipe_defaults`): fields a
    user sets in a file or on the command line win, the rest take the recipe's values. Build such
    configs with `build_config` or `TrainConfig.for_recipe`; `TrainConfig(recipe="airbench")`
    alone keeps the resnet9 values of the other fields. The fields under "recipe airbench only"
    switch its published methods on or off (for ablations); resnet9 ignores them.

    `arch` trains a NAS subnet instead of the ResNet (recipe resnet9 only): the standalone
    network of an architecture file (`arch/top_K.json`, `architecture_final.json` or a plain NNI
    `{key: choice}`) in the space `space`, with the widths prep/layer1..3 and `logits_weight`
    (res_*/extra_* do not apply). A file that embeds its space (`"space": {...}`, as
    `effcifar search` writes them) is built in that space and `space` is ignored.
    """

    # Counted in epochs of the run: a layer (file, option) that sets total_epoch alone scales them with it.
    SCHEDULE: ClassVar[dict[str, tuple[str, ...]]] = {"total_epoch": ("peak_epoch", "whiten_bias_epochs")}

    recipe: str = setting("resnet9", "the training method; airbench changes the defaults of the fields it tunes",
                          tuple(RECIPES))
    arch: str | None = setting(None, "architecture file of a NAS subnet to train instead of the ResNet (resnet9 only)")
    space: str = setting("seed", "the space `arch` belongs to (a built-in name or a space file), unless the file "
                                 "embeds one")
    peak_epoch: float = setting(5, "epoch at which the learning rate peaks (it rises linearly from 0 to there)")
    total_epoch: int = setting(24, "epochs of the run; the learning rate falls linearly to 0 at the end")
    res_prep: int = setting(0, "residual blocks in the prep stage")
    res_layer1: int = setting(1, "residual blocks in stage 1 (after its conv and pooling)")
    res_layer2: int = setting(0, "residual blocks in stage 2 (after its conv and pooling)")
    res_layer3: int = setting(1, "residual blocks in stage 3 (after its conv and pooling)")
    extra_prep: int = setting(0, "extra conv-BN-ReLU layers in the prep stage (after the residual blocks)")
    extra_layer1: int = setting(0, "extra conv-BN-ReLU layers in stage 1 (after the residual blocks)")
    extra_layer2: int = setting(0, "extra conv-BN-ReLU layers in stage 2 (after the residual blocks)")
    extra_layer3: int = setting(0, "extra conv-BN-ReLU layers in stage 3 (after the residual blocks)")
    compile: bool = execution(False, "compile the network with torch.compile (faster steps after a slow start)")
    tta: bool = setting(False, "average the logits of each test image and its mirror image")

    @classmethod
    def recipe_defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Field values that the recipe named in `values` puts in place of the resnet9 defaults."""
        name = values.get("recipe", "resnet9")
        return recipe_class(name).defaults(values) if name in RECIPES else {}

    @classmethod
    def for_recipe(cls, recipe: str = "resnet9", **fields: Any) -> "TrainConfig":
        """A checked config of `recipe` with its defaults, where the given `fields` win (as build_config does)."""
        return build_from_layers(cls, [("TrainConfig.for_recipe", {"recipe": recipe, **fields}, False)])

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for the first value outside its range."""
        check_seed("seed", self.seed)
        if self.recipe not in RECIPES:
            raise field_error("recipe", f"one of {', '.join(RECIPES)}", self.recipe)
        if self.dataset not in DATASET_NAMES:
            raise field_error("dataset", f"one of {', '.join(DATASET_NAMES)}", self.dataset)
        positive = ["batch_size", "total_epoch", "eval_batch_size", *STAGES]
        for name in positive:
            if getattr(self, name) <= 0:
                raise field_error(name, "a positive integer", getattr(self, name))
        non_negative = ["subset", "holdout", "crop_pad", "threads", "whiten_bias_epochs", *self.depth_fields()]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise field_error(name, "an integer >= 0", getattr(self, name))
        if not 0 <= self.cutout <= 32:
            raise field_error("cutout", "an integer in [0, 32]", self.cutout)
        if self.crop_pad > 16:
            raise field_error("crop_pad", "an integer in [0, 16]", self.crop_pad)
        if not 0 <= self.peak_epoch <= self.total_epoch:
            raise field_error("peak_epoch", f"a number in [0, total_epoch={self.total_epoch}]", self.peak_epoch)
        for name in ("peak_lr", "logits_weight", "bn_bias_lr"):
            if not getattr(self, name) > 0:
                raise field_error(name, "a number > 0", getattr(self, name))
        if not self.base_wd >= 0:
            raise field_error("base_wd", "a number >= 0", self.base_wd)
        if not 0 <= self.momentum < 1:
            raise field_error("momentum", "a number in [0, 1)", self.momentum)
        if not 0 <= self.label_smoothing < 1:
            raise field_error("label_smoothing", "a number in [0, 1)", self.label_smoothing)
        if self.precision not in PRECISIONS:
            raise field_error("precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        check_device_name(self.device)  # whether the machine has that GPU is asked where the run starts
        if self.arch is not None:
            if self.recipe != "resnet9":
                raise field_error("arch", f"none with recipe {self.recipe} (a NAS subnet trains with resnet9)", self.arch)
            self.architecture()

    def architecture(self) -> tuple[Any, dict[str, str]]:
        """(ArchSpace, architecture) of `arch`; a ConfigError with field 'arch' names the file and the problem."""
        try:
            return plugin(ARCH_FILE_READER)(str(self.arch), self.space)
        except ConfigError as e:
            err = ConfigError(f"field 'arch': {e}")
            err.field = "arch"  # type: ignore[attr-defined]
            raise err from None

    @staticmethod
    def depth_fields() -> list[str]:
        """Names of the res_*/extra_* depth fields."""
        return [f"{kind}_{stage}" for kind in ("res", "extra") for stage in STAGES]

    def net_config(self, num_classes: int) -> NetConfig:
        """The network this config describes."""
        return NetConfig(
            channels={s: getattr(self, s) for s in STAGES},
            res_layers={s: getattr(self, f"res_{s}") for s in STAGES},
            extra_layers={s: getattr(self, f"extra_{s}") for s in STAGES},
            logits_weight=self.logits_weight,
            num_classes=num_classes,
        )


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
    """Piecewise-linear schedule 0 -> peak_lr at peak_epoch -> 0 at total_epoch."""
    return float(np.interp(epoch, [0, config.peak_epoch, config.total_epoch], [0, config.peak_lr, 0]))


def check_device_name(name: str) -> None:
    """ConfigError (field 'device') unless `name` is auto, cpu, cuda or cuda:N.

    A saved config may name a GPU that the machine reading it lacks: only a run checks that.
    """
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise field_error("device", "auto, cpu, cuda or cuda:N", name)


def device_type(name: str) -> str:
    """'cuda' or 'cpu': the kind of device a checked name means here, without asking for that GPU."""
    check_device_name(name)
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_device(name: str) -> torch.device:
    """'auto' means the first GPU when there is one; a bad name or a GPU this machine lacks is a ConfigError."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if torch.version.cuda else f"a PyTorch {torch.__version__} without CUDA"
            raise field_error("device", f"auto or cpu, or a GPU this machine has ({have})", name)
    return device


def cpu_has_bf16_matrix_units() -> bool:
    """True on CPUs with AMX-BF16 tiles, where bf16 convolutions run 2-3x faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' means bf16 where the hardware runs it natively (most GPUs, AMX CPUs), else fp16 on GPU, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16_matrix_units() else "fp32"


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
    data_bytes = (n_train + n_eval) * (3 * IMAGE_SIDE * IMAGE_SIDE + 8)  # uint8 as loaded (no padded copy), int64 labels
    need = memory.estimate(build, config.batch_size, config.eval_batch_size, data_bytes,
                           activation_bytes=2 if precision in ("bf16", "fp16") else 4)
    memory.check(need, device, "the widths (prep, layer1..3), batch_size, eval_batch_size or subset")


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
    if len(y_train) < config.batch_size:
        raise field_error("batch_size", f"at most the number of training images ({len(y_train)})", config.batch_size)
    mean, std = data.mean_std()
    common = dict(mean=mean, std=std, device=device, channels_last=config.channels_last)
    train_loader = DeviceLoader(
        x_train, y_train, batch_size=config.batch_size, shuffle=True, drop_last=True, seed=config.seed,
        augment=augment or Augment(crop_pad=config.crop_pad, flip=config.flip, cutout=config.cutout), **common,
    )
    return train_loader, DeviceLoader(x_valid, y_valid, batch_size=config.eval_batch_size, **common)


class TrainStep:
    """One SGD step of the recipe: forward under autocast, label-smoothed loss, backward, update.

    Mixed precision: bf16 autocast needs no loss scaling; fp16 uses a GradScaler. With
    `config.compile` the forward/backward runs through torch.compile.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, precision: str,
                 param_groups: list[dict[str, Any]] | None = None, before_update: Callable[[], None] | None = None):
        self.model = model
        self.before_update = before_update  # runs between backward and the optimiser step
        self.model_to_run = torch.compile(model) if config.compile else model
        self.label_smoothing = config.label_smoothing
        self.device_type = next(model.parameters()).device.type
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")
        self.optimizer = torch.optim.SGD(  # a group's "lr_scale" multiplies the scheduled LR
            param_groups or model.parameters(), lr=0.0, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.base_wd,
        )

    def autocast(self) -> torch.autocast:
        """The autocast context of this run's precision (a no-op for fp32)."""
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

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
    predict: Predict | None = None,
) -> tuple[float, float]:
    """(mean loss, accuracy) on a loader; with tta, logits of the image and its mirror are averaged.

    `predict`, if given, replaces the model call and `tta` (the airbench recipe's multi-crop TTA).
    """
    if predict is None:
        predict = mirror_logits if tta else plain_logits
    model.eval()
    loss_sum = torch.zeros((), device=loader.labels.device)
    correct = torch.zeros((), device=loader.labels.device, dtype=torch.long)
    with torch.inference_mode(), autocast():
        for x, y in loader:
            logits = predict(model, x)
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


def device_name(device: torch.device) -> str:
    """Human-readable device name (GPU model or CPU with thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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


class Recipe:
    """The parts of a run that differ between recipes; this base class is the resnet9 recipe (cifar10-fast).

    `train()` runs one loop for every recipe and asks its recipe for the network, the optimiser
    step, the LR, the augmentation and the evaluation, and lets it act at the start of each epoch,
    after each step and at the end of training. effcifar.airbench.AirbenchRecipe overrides them.
    """

    def __init__(self, config: TrainConfig):
        self.config = config

    @classmethod
    def defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Field values this recipe puts in place of the resnet9 defaults (given the values set so far)."""
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
            return plugin(SUBNET_BUILDER)(space, arch, {s: getattr(c, s) for s in STAGES}, num_classes, c.logits_weight)
        return ResNet(c.net_config(num_classes))

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

    def evaluate(self, model: nn.Module, loader: DeviceLoader, autocast: Any, final: bool) -> tuple[float, float]:
        """(mean loss, accuracy) on a loader; `final` marks the evaluation after the last epoch."""
        return evaluate(model, loader, autocast, self.config.label_smoothing, self.config.tta)


def plugin(ref: str) -> Any:
    """The object a "module:attribute" reference names, imported on first use."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


def recipe_class(name: str) -> type[Recipe]:
    """The Recipe class registered as `name` in RECIPES."""
    return plugin(RECIPES[name])


def recipe_for(config: TrainConfig) -> Recipe:
    """The Recipe object of `config.recipe`."""
    return recipe_class(config.recipe)(config)


def train(
    config: TrainConfig, out_dir: str | Path | None = None, *, callbacks: Sequence[EpochCallback] = (),
    on_step: StepHook | None = None, data: CifarData | None = None,
) -> TrainResult:
    """Run one training run; write the run directory if `out_dir` is given.

    `data` lets a caller that runs many trials load the dataset once. Each callback receives
    the metrics of every epoch; if one returns True the run stops after that epoch. The run
    directory is locked while the run writes it (`effcifar.rundir`).
    """
    config.validate()
    out = Path(out_dir) if out_dir is not None else None
    with locked(out, "train") if out is not None else contextlib.nullcontext():
        return run_training(config, out, callbacks, on_step, data)


def run_training(config: TrainConfig, out: Path | None, callbacks: Sequence[EpochCallback], on_step: StepHook | None,
                 data: CifarData | None) -> TrainResult:
    """The body of `train`, with its run directory (if any) locked."""
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = data if data is not None else load_dataset(config.dataset, config.data_dir)
    recipe = recipe_for(config)
    # a partial, not a lambda: `data` is deleted below (a lambda naming it reads as a use after del)
    check_memory(config, data, device, precision, functools.partial(recipe.build_model, data.num_classes))
    train_loader, valid_loader = device_loaders(config, data, device, recipe.augment())
    test_loader = valid_loader
    mean, std = data.mean_std()
    if config.holdout:
        test_loader = DeviceLoader(data.x_test, data.y_test, batch_size=config.eval_batch_size, mean=mean, std=std,
                                   device=device, channels_last=config.channels_last)

    seed_everything(config.seed)
    model = recipe.build_model(data.num_classes, train_loader).to(device)
    dataset = {"name": data.name, "source": data.source, "num_classes": data.num_classes}
    classes = list(data.classes)
    del data  # the loaders hold the images they use; a data set loaded here is not kept through training
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params, flops = count_parameters(model), count_flops(model)
    step_fn = recipe.train_step(model, precision)

    if out is not None:
        save_config(config, out / "config.yaml")
        if config.arch is not None:  # the run keeps its architecture and space, wherever the file was
            space, arch = config.architecture()
            record = {"arch": arch, "space": space.to_dict(), "source": config.arch}
            atomic_write(out / ARCH_FILE, json.dumps(record, indent=2) + "\n")

    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.total_epoch
    history: list[EpochMetrics] = []
    train_time = 0.0
    step = 0
    stopped_early = False
    for epoch in range(1, config.total_epoch + 1):
        step_fn.model_to_run.train()
        epoch_start = time.perf_counter()
        recipe.start_epoch(epoch, model, train_loader)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for x, y in train_loader:
            lr = recipe.lr(step / steps_per_epoch)
            loss, logits = step_fn(x, y, lr)
            loss_sum += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            step += 1
            recipe.after_step(model, step, total_steps)
            if on_step is not None:
                on_step(step, total_steps)
        last = epoch == config.total_epoch
        if last:
            recipe.finish(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        n_seen = steps_per_epoch * config.batch_size
        valid_loss, valid_acc = recipe.evaluate(step_fn.model_to_run, valid_loader, step_fn.autocast, last)
        metrics = EpochMetrics(
            epoch=epoch, lr=lr, train_loss=loss_sum.item() / n_seen, train_acc=correct.item() / n_seen,
            valid_loss=valid_loss, valid_acc=valid_acc, epoch_time=epoch_time, train_time=train_time,
            total_time=time.perf_counter() - start,
        )
        history.append(metrics)
        if out is not None:
            write_logs(out / "logs.tsv", history)
        if not math.isfinite(metrics.train_loss):
            raise TrainingDiverged(f"train loss is {metrics.train_loss} at epoch {epoch} (peak_lr {config.peak_lr})")
        if any([bool(cb(metrics)) for cb in callbacks]) and epoch < config.total_epoch:
            stopped_early = True
            break

    test_acc = history[-1].valid_acc
    if config.holdout:
        test_acc = recipe.evaluate(step_fn.model_to_run, test_loader, step_fn.autocast, True)[1]
    summary = {
        "config": asdict(config),
        "dataset": {**dataset,
                    "train_images": len(train_loader.labels), "valid_images": len(valid_loader.labels),
                    "valid_split": "holdout" if config.holdout else "test"},
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "final_valid_acc": history[-1].valid_acc,
        "best_valid_acc": max(m.valid_acc for m in history),
        "test_acc": test_acc,
        "train_time": train_time,
        "total_time": time.perf_counter() - start,
        "params": params,
        "flops": flops,
        "device": device_name(device),
        "precision": precision,
        "malloc": allocator_in_effect(),
        "seed": config.seed,
        "versions": library_versions(),
    }
    if out is not None:
        atomic_torch_save(model_record(model, config, mean, std, classes), out / "model.pt")
        atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return TrainResult(model=model, history=history, summary=summary, out_dir=out, stopped_early=stopped_early)


def model_record(model: nn.Module, config: TrainConfig, mean: Sequence[float], std: Sequence[float],
                 classes: Sequence[str]) -> dict[str, Any]:
    """What model.pt holds: the weights and all a prediction needs without the dataset (`effcifar.load_model`):
    the input normalisation (per-channel mean and std in 0..255 units), the class names, the config and, for a
    NAS subnet, its architecture and space. Plain data and tensors only, so `torch.load(weights_only=True)` reads
    it."""
    record = {"format": MODEL_FORMAT, "state_dict": model.state_dict(), "mean": [float(v) for v in mean],
              "std": [float(v) for v in std], "classes": [str(c) for c in classes], "config": asdict(config)}
    if config.arch is not None:
        space, arch = config.architecture()
        record["arch"] = {"arch": dict(arch), "space": space.to_dict()}
    return record
