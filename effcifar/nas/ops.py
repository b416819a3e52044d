"""The candidate ops and the head of a space as nn.Modules, built from their names (see `space.op_spec`).

An op is a conv-BN-ReLU (optionally pooled or strided), MobileNetV2's inverted residual, or the
identity. In an elastic stage (one with width choices, or after one) the ops are built at the
stage's largest width from the sliced layers below, and a path of width w runs the first w output
channels of each conv (and the first input channels it receives), the matching slice of
BatchNorm's parameters and statistics, and the head's first columns: every width shares the same
weights. In an inverted residual (`mb*`) the expanded channels follow the input (e x its
channels) and the projection the stage's width.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from effcifar.models import Scale
from effcifar.nas.space import OP_GRAMMAR, HeadSpec, op_spec


class SlicedConv2d(nn.Conv2d):
    """A conv held at its largest width that runs its first `active_out` output channels (None: all) on the
    input channels it receives: the weights every width of an elastic stage shares. A depthwise conv runs one
    filter per input channel; with `expansion` the output is that many times the input's channels."""

    active_out: int | None = None
    expansion: int = 0  # an inverted residual's expansion conv: e x the input channels out (0: active_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if self.groups > 1:  # depthwise
            bias = None if self.bias is None else self.bias[:c]
            return F.conv2d(x, self.weight[:c], bias, self.stride, self.padding, self.dilation, c)
        out = c * self.expansion if self.expansion else self.active_out
        bias = None if self.bias is None else self.bias[:out]
        return self._conv_forward(x, self.weight[:out, :c], bias)


class SlicedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first channels of its largest width, as many as the input has; the running statistics
    of the slice are updated in place in the shared buffers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average (BN recalibration)
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        mean = self.running_mean[:c] if track and self.running_mean is not None else None
        var = self.running_var[:c] if track and self.running_var is not None else None
        weight = None if self.weight is None else self.weight[:c]
        bias = None if self.bias is None else self.bias[:c]
        return F.batch_norm(x, mean, var, weight, bias, use_batch, momentum, self.eps)


class SlicedLinear(nn.Linear):
    """A linear layer held at its largest input width that uses the first columns, as many as the input has."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, :x.shape[1]], self.bias)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + BN + ReLU, depthwise + BN + ReLU, 1x1 project + BN (+ input).

    `sliced`: elastic (see SlicedConv2d): the expansion and depthwise convs run on e x the input's
    channels, the projection on the stage's chosen width.
    """

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int, sliced: bool = False):
        super().__init__()
        conv, norm = (SlicedConv2d, SlicedBatchNorm2d) if sliced else (nn.Conv2d, nn.BatchNorm2d)
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            expand = conv(c_in, hidden, 1, bias=False)
            expand.expansion = expansion
            layers += [expand, norm(hidden), nn.ReLU(inplace=True)]
        layers += [
            conv(hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden, bias=False),
            norm(hidden), nn.ReLU(inplace=True),
            conv(hidden, c_out, 1, bias=False), norm(c_out),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def make_op(name: str, c_in: int, c_out: int, sliced: bool = False) -> nn.Module:
    """The module of op `name` (see `op_spec`) from c_in to c_out channels; `sliced`: with the modules of an
    elastic stage (SlicedConv2d, SlicedBatchNorm2d)."""
    op = op_spec(name)
    if op is None:
        raise ValueError(f"not an op name: {name!r} (expected {OP_GRAMMAR})")
    conv, norm = (SlicedConv2d, SlicedBatchNorm2d) if sliced else (nn.Conv2d, nn.BatchNorm2d)
    if op.family == "mb":
        return InvertedResidual(c_in, c_out, op.expansion, op.kernel, op.stride, sliced)
    if op.family == "identity":
        if op.stride == 1 and c_in == c_out:
            return nn.Identity()
        return nn.Sequential(conv(c_in, c_out, 1, stride=op.stride, bias=False), norm(c_out))
    layers: list[nn.Module] = [
        conv(c_in, c_out, op.kernel, stride=op.stride, padding=op.kernel // 2, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
    ]
    if op.pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def make_head(head: HeadSpec, c_in: int, num_classes: int, logits_weight: float = 0.125,
              sliced: bool = False) -> nn.Sequential:
    """The declared head (see HeadSpec) on c_in channels; `sliced`: on the first channels it receives (after an
    elastic stage)."""
    layers: list[nn.Module] = []
    if head.conv is not None:
        conv = SlicedConv2d if sliced else nn.Conv2d
        layers += [conv(c_in, head.conv, 1, bias=False), nn.BatchNorm2d(head.conv), nn.ReLU(inplace=True)]
        c_in, sliced = head.conv, False
    linear = SlicedLinear if sliced else nn.Linear
    layers += [nn.AdaptiveMaxPool2d(1) if head.pool == "max" else nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               linear(c_in, num_classes, bias=head.bias)]
    return nn.Sequential(*layers, *([Scale(logits_weight)] if head.scale_logits else []))
