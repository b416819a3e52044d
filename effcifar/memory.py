"""The memory a run needs, checked against what its device has free before anything large is allocated.

`estimate` builds the network on the meta device (shapes only, nothing is allocated) and counts its
weights with their gradients and SGD momentum, the activations a training step keeps for the
backward pass (every leaf module's output at the batch size), the largest layer output of an
evaluation batch, and the images and labels the run keeps on the device. Allocator overheads and
temporaries come on top, so `check` refuses only what cannot fit: a config whose estimate exceeds
the free memory is a one-line ConfigError with both figures, instead of an allocation failure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from effcifar.errors import ConfigError

WEIGHT_COPIES = 3  # the weights, their gradients and SGD's momentum buffer, fp32
IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run keeps on its device."""

    weights: int  # parameters, gradients, momentum and buffers
    activations: int  # saved for backward at the training batch size (or an evaluation batch's, if larger)
    data: int  # images and labels resident on the device

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.data

    def describe(self) -> str:
        return (f"about {gib(self.total)} (weights, gradients and momentum {gib(self.weights)}, "
                f"activations {gib(self.activations)}, data {gib(self.data)})")


def gib(size: float) -> str:
    """Bytes as GiB for messages."""
    return f"{size / 2**30:,.1f} GiB"


def estimate(build: Callable[[], nn.Module], batch_size: int, eval_batch_size: int, data_bytes: int,
             activation_bytes: int = 4) -> MemoryEstimate:
    """The estimate for the network `build()` makes (called under the meta device) at these batch sizes.

    `activation_bytes` is the size of one activation (2 under bf16/fp16 autocast).
    """
    with torch.device("meta"):
        model = build()
    outputs: list[int] = []

    def record(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output.numel())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    with torch.no_grad():
        model(torch.empty(1, *IMAGE_SHAPE, device="meta"))
    for hook in hooks:
        hook.remove()
    weights = sum(p.numel() for p in model.parameters()) * WEIGHT_COPIES + sum(b.numel() for b in model.buffers())
    training = sum(outputs) * batch_size
    evaluation = 2 * max(outputs, default=0) * eval_batch_size  # a layer's input and output at a time
    return MemoryEstimate(4 * weights, activation_bytes * max(training, evaluation), data_bytes)


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: the GPU's free memory, or the host's available memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check(need: MemoryEstimate, device: torch.device, fields: str) -> None:
    """ConfigError if `need` exceeds what `device` has free; `fields` names what to lower."""
    free = free_memory(device)
    if need.total > free:
        raise ConfigError(f"the run needs {need.describe()} but {device} has {gib(free)} free; "
                          f"lower {fields}")
