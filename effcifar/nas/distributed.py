"""Data-parallel supernet training under `torchrun`: ranks, global-batch BatchNorm, gradient averaging.

Each rank sees the same global batch and path, trains on its slice, and batch norm uses
statistics of the whole global batch, so N processes compute the same update as one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from effcifar.errors import ConfigError
from effcifar.nas.ops import SlicedBatchNorm2d


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
    which multi-path steps (sandwich, fair) do not fit.
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


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True when `flag` is true on any rank (a stop signal: all ranks then stop at the same step)."""
    if not ranks.launched:
        return flag
    on_any = torch.tensor([float(flag)], device=device)
    dist.all_reduce(on_any, op=dist.ReduceOp.MAX)
    return bool(on_any.item())
