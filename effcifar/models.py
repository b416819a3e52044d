"""The original series' configurable ResNet family ("dictionary network") and its cost figures.

The network is cifar10-fast's ResNet-9 generalised: four stages (prep, layer1, layer2, layer3),
each a conv3x3-BN-ReLU (+ maxpool2 for layer1-3) followed by `res_layers[stage]` residual blocks
and `extra_layers[stage]` extra conv-BN-ReLU layers; then a global max-pool, a bias-free linear
layer and a fixed logits scale.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

NETWORK_STAGES = ("prep", "layer1", "layer2", "layer3")  # in order; also the names of their width fields


@dataclass(frozen=True)
class NetConfig:
    """Widths and depths of the network family; the defaults are cifar10-fast's ResNet-9."""

    channels: dict[str, int] = field(
        default_factory=lambda: {"prep": 64, "layer1": 128, "layer2": 256, "layer3": 512}
    )
    res_layers: dict[str, int] = field(
        default_factory=lambda: {"prep": 0, "layer1": 1, "layer2": 0, "layer3": 1}
    )
    extra_layers: dict[str, int] = field(
        default_factory=lambda: {"prep": 0, "layer1": 0, "layer2": 0, "layer3": 0}
    )
    logits_weight: float = 0.125
    num_classes: int = 10


class ConvBnRelu(nn.Sequential):
    """3x3 convolution without bias, batch norm, ReLU: the unit every stage is built from."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class Residual(nn.Module):
    """x + f(f(x)) with two ConvBnRelu units of the same width (cifar10-fast's residual)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(ConvBnRelu(channels, channels), ConvBnRelu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Scale(nn.Module):
    """Multiplies by a constant: cifar10-fast's logits weight, which acts like a softmax temperature."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def make_stage(c_in: int, c_out: int, pool: bool, res_layers: int, extra_layers: int) -> nn.Sequential:
    """conv-BN-ReLU (+ maxpool), then the residual blocks, then the extra layers, as in the seed."""
    layers: list[nn.Module] = [ConvBnRelu(c_in, c_out)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [Residual(c_out) for _ in range(res_layers)]
    layers += [ConvBnRelu(c_out, c_out) for _ in range(extra_layers)]
    return nn.Sequential(*layers)


class ResNet(nn.Sequential):
    """The original series' network family: prep, layer1-3, global max-pool, linear, logits scale."""

    def __init__(self, cfg: NetConfig = NetConfig()):
        layers: dict[str, nn.Module] = {}
        c_in = 3
        for stage in NETWORK_STAGES:
            c_out = cfg.channels[stage]
            layers[stage] = make_stage(
                c_in, c_out, pool=stage != "prep",
                res_layers=cfg.res_layers[stage], extra_layers=cfg.extra_layers[stage],
            )
            c_in = c_out
        layers["pool"] = nn.AdaptiveMaxPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["linear"] = nn.Linear(c_in, cfg.num_classes, bias=False)
        layers["logits"] = Scale(cfg.logits_weight)
        super().__init__(OrderedDict(layers))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32), backward: bool = False) -> int:
    """FLOPs of one forward (or forward+backward) pass, counted by torch.utils.flop_counter.

    Counts matmuls and convolutions (2 FLOPs per multiply-add), the operations that dominate
    the cost; elementwise work (BN, ReLU, pooling) is not counted. Runs on a meta-device copy,
    so the model's weights and BN statistics are untouched and nothing is computed.
    """
    shadow = copy.deepcopy(model).to("meta").train(backward)
    x = torch.zeros(input_shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            shadow(x).sum().backward()
        else:
            with torch.no_grad():
                shadow(x)
    return counter.get_total_flops()
