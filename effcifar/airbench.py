"""The airbench recipe (`recipe: airbench`): CIFAR-10 to 94% in about 10 epochs.

Our implementation of the methods of Keller Jordan's airbench94 ("94% on CIFAR-10 in 3.29
seconds on a single GPU", arXiv 2404.00498), written from the paper and its ablations:

- a first 2x2 convolution whose filters whiten the image patches of the training set and stay
  frozen (its bias trains for a few epochs);
- a narrow network of three conv groups (conv-pool-BN-GELU-conv-BN-GELU), 3x3 convs initialised
  as identity on their first input channels, BatchNorm with a fixed scale of 1;
- label smoothing, Nesterov SGD at batch 1024 with a triangular LR (0.2 -> 1 -> 0.07 of the
  peak), BatchNorm biases at 64x the LR, lookahead towards a slow average of the weights;
- alternating flip (every image is mirrored on alternate epochs instead of at random), 2-pixel
  translation, and multi-crop test-time augmentation (mirror + 1-pixel translations).

It plugs into `effcifar.train.train()` as a `Recipe` (registered by name in `train.RECIPES`): the
loop, loaders, logs and run directory are the trainer's. Every method is a switch of the recipe's
own fields (`AirbenchFields`, given flat with `recipe: airbench`, e.g. `whiten: false`, for
ablations); `airbench_defaults` lists what the recipe changes in the shared fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effcifar.config import setting
from effcifar.data import Augment, DeviceLoader, batch_flip
from effcifar.device import Autocast, device_type
from effcifar.models import Scale
from effcifar.train import (
    Predict, Recipe, RecipeFields, TrainConfig, TrainStep, evaluate, mirror_logits, plain_logits,
)

# The published hyper-parameters, in TrainConfig's units. airbench94 sums the loss over the batch and
# divides its LR (11.5 per 1024 images) by 1024 * (1 + 1 / (1 - momentum)); for the mean loss at batch
# 1024 that is 11.5 / (1 + 1 / 0.15) = 1.5. Its weight decay 0.0153 is per unit of its LR: 0.0153 / 11.5.
AIRBENCH_MOMENTUM = 0.85
AIRBENCH_FIELDS: dict[str, Any] = {
    "batch_size": 1024,
    "epochs": 10,  # airbench94 trains 9.9 epochs; our schedules count whole epochs (the LR peaks at PEAK_SHARE)
    "peak_lr": 11.5 / (1 + 1 / (1 - AIRBENCH_MOMENTUM)),
    "base_wd": 0.0153 / 11.5,
    "momentum": AIRBENCH_MOMENTUM,
    "nesterov": True,
    "label_smoothing": 0.2,
    "crop_pad": 2,  # translate by up to 2 pixels
    "flip": True,
    "cutout": 0,
    "logits_weight": 1 / 9,
    "layer1": 64,  # widths of the three conv groups
    "layer2": 256,
    "layer3": 256,
    "tta": True,
}
PEAK_SHARE = 0.23  # the LR peaks at 23% of training (epoch 2.3 of 10)
LR_START, LR_END = 0.2, 0.07  # the triangular schedule starts and ends at these fractions of peak_lr
BN_MOMENTUM = 0.4  # PyTorch's convention (weight of the new batch); airbench94 writes 0.6 for the old
BN_EPS = 1e-12
WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4  # added to the patch covariance's eigenvalues before dividing by their square root
WHITEN_IMAGES = 5000  # training images (a seeded random sample) whose patches estimate the covariance
LOOKAHEAD_EVERY = 5  # steps between lookahead updates
LOOKAHEAD_MAX_DECAY = 0.95**LOOKAHEAD_EVERY  # the pull's strength ramps as (progress ** 3) to this


@dataclass
class AirbenchFields(RecipeFields):
    """Recipe airbench only: each switch turns one published method off, for ablations."""

    EPOCH_FIELDS: ClassVar[tuple[str, ...]] = ("whiten_bias_epochs",)

    whiten: bool = setting(True, "first conv = frozen 2x2 patch-whitening filters from training-set statistics")
    whiten_bias_epochs: int = setting(3, "the whitening conv's bias trains for this many epochs, then freezes")
    identity_init: bool = setting(True, "3x3 convs start as identity (dirac) on their first input channels")
    lookahead: bool = setting(True, "every 5 steps pull the weights toward their slow average; end on the average")
    alt_flip: bool = setting(True, "flip every image on alternate epochs (random in the first) instead of at random")
    multicrop_tta: bool = setting(True, "with tta, also average the mirror pairs of two 1-pixel translations")
    bn_bias_lr: float = setting(64.0, "LR multiplier of the BatchNorm biases (their weight decay is divided by it); "
                                      "1: off")


def switches(config: TrainConfig) -> AirbenchFields:
    """The airbench fields of a config of this recipe."""
    assert isinstance(config.recipe_fields, AirbenchFields), "a config of recipe airbench"
    return config.recipe_fields


def airbench_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """The shared fields' airbench values; torch.compile only when the run's device is a GPU."""
    return {**AIRBENCH_FIELDS, "compile": device_type(str(values.get("device", "auto"))) == "cuda"}


class FixedScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1 (only the bias learns), airbench's eps and momentum."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.weight.requires_grad_(False)


def identity_init_(conv: nn.Conv2d) -> None:
    """Make the first `in_channels` filters pass their input channel through (dirac); others keep their init."""
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: conv.in_channels])


class ConvGroup(nn.Sequential):
    """conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU: one of airbench's three stages."""

    def __init__(self, c_in: int, c_out: int, identity_init: bool):
        conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        if identity_init:
            identity_init_(conv1)
            identity_init_(conv2)
        super().__init__(conv1, nn.MaxPool2d(2), FixedScaleBatchNorm(c_out), nn.GELU(),
                         conv2, FixedScaleBatchNorm(c_out), nn.GELU())


def patch_whitening(images: torch.Tensor, kernel: int, eps: float = WHITEN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a conv whose outputs are the image patches' whitened coordinates.

    The patch covariance C = V diag(l) V^T gives filters V^T / sqrt(l + eps) (each followed by its
    negation, so that the GELU after it keeps both signs) and a bias that centres the patches: on
    `images` the first half of the outputs has zero mean and covariance l / (l + eps), about 1.
    """
    c = images.shape[1]
    patches = images.float().unfold(2, kernel, 1).unfold(3, kernel, 1)  # n, c, h', w', k, k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kernel * kernel)
    mean = patches.mean(0)
    centred = patches - mean
    cov = (centred.T @ centred).double() / len(centred)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    mean = mean.double()
    filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)).T  # one row per output channel
    weight = torch.cat([filters, -filters]).reshape(-1, c, kernel, kernel)
    bias = -torch.cat([filters, -filters]) @ mean
    return weight.float(), bias.float()


def build_airbench_net(config: TrainConfig, num_classes: int, whiten_images: torch.Tensor | None) -> nn.Sequential:
    """Whitening conv - GELU - three ConvGroups (layer1..3 widths) - global max-pool - linear - scale.

    With the `whiten` switch the first conv is initialised from `whiten_images` (normalised NCHW;
    None leaves it at its default init, for loading saved weights) and its weight is frozen.
    """
    width = 2 * 3 * WHITEN_KERNEL**2
    first = nn.Conv2d(3, width, WHITEN_KERNEL, bias=True)
    if switches(config).whiten:
        if whiten_images is not None:
            weight, bias = patch_whitening(whiten_images, WHITEN_KERNEL)
            with torch.no_grad():
                first.weight.copy_(weight)
                first.bias.copy_(bias)
        first.weight.requires_grad_(False)
    widths = [width, config.layer1, config.layer2, config.layer3]
    groups = [ConvGroup(c_in, c_out, switches(config).identity_init) for c_in, c_out in zip(widths, widths[1:])]
    return nn.Sequential(
        first, nn.GELU(), *groups, nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(config.layer3, num_classes, bias=False), Scale(config.logits_weight),
    )


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """BatchNorm biases at `bn_bias_lr` times the LR (weight decay divided by it, so its step is unchanged); the
    whitening conv's bias in a group of its own (first), which `AirbenchRecipe` freezes; the rest as usual.

    Parameters frozen now are included, so that a layer unfrozen later would still be optimised.
    """
    bn = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.bias,)]
    whiten_bias = model[0].bias
    special = {id(p) for p in [*bn, whiten_bias]}
    other = [p for p in model.parameters() if id(p) not in special]
    scale = switches(config).bn_bias_lr
    return [
        {"params": [whiten_bias], "lr_scale": 1.0, "weight_decay": config.base_wd},
        {"params": bn, "lr_scale": scale, "weight_decay": config.base_wd / scale},
        {"params": other, "lr_scale": 1.0, "weight_decay": config.base_wd},
    ]


class Lookahead:
    """A slow copy of the weights: every few steps it moves toward the weights, and the weights jump to it.

    The slow copy's decay ramps from 0 (it just follows) to 0.95^5 as (progress ** 3), so late
    training averages out SGD noise like an EMA; at the end the network takes the slow weights.
    Covers every floating-point entry of the state dict (BatchNorm statistics too), as two
    multi-tensor operations per update (on a GPU a few kernels, not two per tensor).
    """

    def __init__(self, model: nn.Module):
        self.weights = [v for v in model.state_dict().values() if v.is_floating_point()]  # the model's own storage
        self.slow = [w.clone() for w in self.weights]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """slow <- decay * slow + (1 - decay) * weights; weights <- slow."""
        torch._foreach_lerp_(self.slow, self.weights, 1 - decay)
        torch._foreach_copy_(self.weights, self.slow)


def multicrop_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Multi-crop TTA: 1/2 the mirror-averaged logits of the image, 1/4 each of its 1-pixel up-left and down-right shifts.

    The shifts are windows of the reflect-padded image, as airbench94's `tta_level=2`.
    """
    size = x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    # copies in the layout of x: a compiled model sees the strides it was compiled for, not a window's
    shifted = [torch.empty_like(x).copy_(window) for window in (padded[..., :size, :size], padded[..., 2:, 2:])]
    return 0.5 * mirror_logits(model, x) + 0.25 * sum(mirror_logits(model, s) for s in shifted)


def alternate_flip_(loader: DeviceLoader, epoch: int) -> None:
    """Alternating flip on the loader's stored images: a random half mirrored in epoch 1, every image mirrored again each later epoch.

    So each image is seen mirrored exactly on alternate epochs. The loader's random crop reflects
    symmetrically at the borders, so mirroring the stored images commutes with it.
    """
    if epoch == 1:
        loader.images = batch_flip(loader.images, loader.generator)
    else:
        loader.images = loader.images.flip(3)


class AirbenchRecipe(Recipe):
    """The airbench methods as the trainer's Recipe hooks (see the module docstring)."""

    fields_class = AirbenchFields
    peak_share = PEAK_SHARE
    defaults = staticmethod(airbench_defaults)

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.switches = switches(config)
        self.lookahead: Lookahead | None = None
        self.whiten_bias_group: dict[str, Any] | None = None  # the optimiser's group of the whitening bias

    def augment(self) -> Augment:
        """Random translation; flips come from `alternate_flip_` unless `alt_flip` is off."""
        c = self.config
        return Augment(crop_pad=c.crop_pad, flip=c.flip and not self.switches.alt_flip, cutout=c.cutout)

    def build_model(self, num_classes: int, train_loader: DeviceLoader | None = None) -> nn.Module:
        """The airbench network, its whitening filters from WHITEN_IMAGES training images drawn at random (seeded)."""
        images = None
        if train_loader is not None and self.switches.whiten:
            images = whitening_sample(train_loader, WHITEN_IMAGES, self.config.seed)
        return build_airbench_net(self.config, num_classes, images)

    def train_step(self, model: nn.Module, precision: str) -> TrainStep:
        """SGD with the BatchNorm-bias LR group and the whitening bias's own group."""
        if self.switches.lookahead:  # here the model sits on its device, in its memory format
            self.lookahead = Lookahead(model)
        step = TrainStep(model, self.config, precision, param_groups(model, self.config))
        self.whiten_bias_group = step.optimizer.param_groups[0]
        return step

    def lr(self, epoch: float) -> float:
        """Triangular: LR_START * peak at 0, peak at peak_epoch, LR_END * peak at the last epoch."""
        c = self.config
        return float(np.interp(epoch, [0, c.peak_epoch, c.epochs],
                               [LR_START * c.peak_lr, c.peak_lr, LR_END * c.peak_lr]))

    def start_epoch(self, epoch: int, model: nn.Module, train_loader: DeviceLoader) -> None:
        """Freeze the whitening bias after `whiten_bias_epochs` (when whitening); alternate the flips.

        Frozen by a learning rate of 0, not `requires_grad`: a compiled network would be compiled
        again (twice: training and evaluation) for a parameter that stops requiring gradients.
        """
        if self.switches.whiten and self.whiten_bias_group is not None:
            self.whiten_bias_group["lr_scale"] = float(epoch <= self.switches.whiten_bias_epochs)
        if self.config.flip and self.switches.alt_flip:
            alternate_flip_(train_loader, epoch)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Every LOOKAHEAD_EVERY steps, the lookahead update with its ramped decay."""
        if self.lookahead is not None and step % LOOKAHEAD_EVERY == 0:
            self.lookahead.update(LOOKAHEAD_MAX_DECAY * (step / total_steps) ** 3)

    def finish(self, model: nn.Module) -> None:
        """The network takes the lookahead's slow weights."""
        if self.lookahead is not None:
            self.lookahead.update(1.0)

    def predict(self, final: bool) -> Predict:
        """Multi-crop TTA in the final evaluation (it costs 6 forward passes), mirror TTA before it."""
        if not self.config.tta:
            return plain_logits
        return multicrop_logits if final and self.switches.multicrop_tta else mirror_logits

    def test_tta(self) -> str | None:
        """Multi-crop, flip or none, as `predict(final=True)`."""
        return "multi-crop" if self.config.tta and self.switches.multicrop_tta else super().test_tta()

    def evaluate(self, model: nn.Module, loader: DeviceLoader, autocast: Autocast, final: bool) -> tuple[float, float]:
        """(mean loss, accuracy) with this recipe's TTA."""
        return evaluate(model, loader, autocast, self.config.label_smoothing, self.config.tta, self.predict(final),
                        one_shape=self.config.compile)


def whitening_sample(loader: DeviceLoader, count: int, seed: int) -> torch.Tensor:
    """`count` of the loader's images drawn at random with `seed`, normalised like its batches (not augmented).

    Drawn, not the first ones: in a copy sorted by class (the shared CIFAR-10 is) the first 5,000
    images are one class, and its patches alone would set the whitening.
    """
    index = torch.randperm(len(loader.labels), generator=torch.Generator().manual_seed(seed))[:count]
    images = loader.images[index.to(loader.images.device)]
    return (images.float() - loader.mean.float()) * loader.inv_std.float()
