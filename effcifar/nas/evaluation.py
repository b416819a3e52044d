"""Judging a subnet of a trained supernet: BN recalibration on training batches, then held-out accuracy.

A shared-weight subnet's BN statistics are a mixture over every path trained so far, so each
judged path first gets statistics of its own (SPOS); the calibration batches are drawn with a
generator of their own, so judging never moves the training's random state. A supernet run's
settings for it are its `evaluation` group (`EvaluationFields`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from effcifar.config import field_error, setting
from effcifar.data import DeviceLoader
from effcifar.nas.costs import CostTable
from effcifar.nas.network import Supernet
from effcifar.nas.path_samplers import PathSampler
from effcifar.nas.space import Arch, ArchSpace


@dataclass
class EvaluationFields:
    """How a supernet run judges its subnets (`SupernetConfig.evaluation`): the per-epoch panel's size and the
    BN recalibration before each judgement (the panel's and shrinking's)."""

    panel_random: int = setting(5, "seeded random subnets in the per-epoch panel (besides largest and smallest)")
    bn_batches: int = setting(10, "training batches used to recalibrate BN before each evaluation")

    def validate(self) -> None:
        """Raise ConfigError (with `field`) for a value out of its range."""
        if self.panel_random < 0:
            raise field_error("panel_random", "an integer >= 0", self.panel_random)
        if self.bn_batches <= 0:
            raise field_error("bn_batches", "a positive integer", self.bn_batches)


def recalibrate_bn(model: nn.Module, batches: list[torch.Tensor], autocast: Callable[[], Any]) -> None:
    """Re-estimate every BN layer's running statistics as the plain average over `batches`; leave it in eval mode.

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


def evaluate_subnet(net: Supernet, arch: Arch, bn_batches: list[torch.Tensor], loader: DeviceLoader,
                    autocast: Callable[[], Any]) -> SubnetScore:
    """One path's held-out figures: select it, recalibrate BN on `bn_batches`, evaluate on `loader`."""
    net.set_arch(arch)
    recalibrate_bn(net, bn_batches, autocast)
    return accuracy(net, loader, autocast)


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
