"""Supernet training throughput vs the core trainer on the same paths, and checkpoint save/load time.

    python bench/supernet.py                          # widths 16/32/64/128, batch 512, 8 paths
    python bench/supernet.py --widths 64,128,256,512 --paths 8 --rounds 5

(a) the SPOS loop: per step, sample a path (the trainer's PathSampler), select it in the
    supernet (`set_arch`) and take the core trainer's `TrainStep` on it; one round takes one
    step on each of K paths, drawn once with a fixed seed.
(b) the core trainer on the fixed subnets: the K standalone networks of the same paths
    (`build_standalone`, only the chosen ops), one `TrainStep` each, one step per network per
    round — the same FLOPs per round as (a).
Rounds alternate a and b (which goes first alternates); medians and the ratio a/b (images per
second) are reported, with the system CPU time per second of each (the process sets malloc as
every effcifar process does; EFFCIFAR_MALLOC=system runs it with the C library's own). Then the
time to save and load a supernet checkpoint (model, optimiser with momentum, RNG states) at
these widths.
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from effcifar.allocator import allocator_in_effect, configure_allocator
from effcifar.data import Augment, DeviceLoader
from effcifar.nas.checkpoint import read_checkpoint, rng_states, save_checkpoint
from effcifar.nas.costs import CostTable
from effcifar.nas.network import Supernet, build_standalone
from effcifar.nas.path_samplers import PathSampler
from effcifar.nas.space import ArchSpace
from effcifar.nas.supernet import SupernetConfig
from effcifar.device import resolve_device, resolve_precision
from effcifar.train import TrainStep


def batches(device: torch.device, batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` augmented random batches from the device loader (content does not matter for speed)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size * count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, batch_size * count)
    loader = DeviceLoader(images, labels, batch_size=batch_size, mean=np.full(3, 120.0), std=np.full(3, 60.0),
                          device=device, augment=Augment(), shuffle=True, drop_last=True)
    return list(loader)


def timed_round(steps: list, data: list) -> tuple[float, float]:
    """(wall, system CPU) seconds for one step of each (step function, prepare) pair on successive batches."""
    start, kernel = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for (step, prepare), (x, y) in zip(steps, data):
        prepare()
        step(x, y, 0.05)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="16,32,64,128")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--paths", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    configure_allocator()  # as every effcifar process does (EFFCIFAR_MALLOC=system turns it off)
    prep, l1, l2, l3 = (int(w) for w in args.widths.split(","))
    config = SupernetConfig.of(prep=prep, layer1=l1, layer2=l2, layer3=l3, batch_size=args.batch_size,
                               device=args.device, precision=args.precision)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    space, channels = ArchSpace.seed(), config.channels()
    costs = CostTable.build(space, channels, 10)
    sampler = PathSampler(costs, seed=0)
    paths = [sampler.sample(space) for _ in range(args.paths)]
    train_config = config.train_config()

    torch.manual_seed(0)
    net = Supernet(space, channels, 10).to(device, memory_format=torch.channels_last)
    supernet_step = TrainStep(net, train_config, precision, fused=False)

    def select(arch: dict[str, str]) -> None:
        sampler.sample(space)  # the real loop's sampling cost; the path itself is fixed for the comparison
        net.set_arch(arch)

    supernet_steps = [(supernet_step, functools.partial(select, arch)) for arch in paths]
    standalone_steps = []
    for arch in paths:
        model = build_standalone(space, arch, channels, 10).to(device, memory_format=torch.channels_last)
        standalone_steps.append((TrainStep(model, train_config, precision), lambda: None))
    data = batches(device, args.batch_size, args.paths)

    timed_round(supernet_steps, data)  # warm-up: allocator, oneDNN/cuDNN kernels
    timed_round(standalone_steps, data)
    times: dict[str, list[float]] = {"a": [], "b": []}
    kernel: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(args.rounds):
        order = [("a", supernet_steps), ("b", standalone_steps)]
        for name, steps in (order if r % 2 == 0 else order[::-1]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, system = timed_round(steps, data)
            times[name].append(wall)
            kernel[name].append(system / wall)
    images = args.paths * args.batch_size
    a, b = (images / statistics.median(times[k]) for k in ("a", "b"))
    flops = statistics.mean(costs.flops_of(p) for p in paths)
    print(f"widths {args.widths}, batch {args.batch_size}, {args.paths} paths (mean {flops / 1e6:.1f} MFLOPs/image), "
          f"{device} {precision}, {torch.get_num_threads()} threads, {args.rounds} rounds, malloc {allocator_in_effect()}")
    print("| widths | a: supernet img/s | b: standalone img/s | a/b | system CPU s per wall s (a / b) |")
    print(f"| {args.widths} | {a:.1f} | {b:.1f} | **{a / b:.3f}** | "
          f"{statistics.median(kernel['a']):.2f} / {statistics.median(kernel['b']):.2f} |")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step_000000001.pt"
        state = {"model": net.state_dict(), "optimizer": supernet_step.optimizer.state_dict(), "rng": rng_states(device)}
        saves, loads = [], []
        for _ in range(3):
            start = time.perf_counter()
            save_checkpoint(state, path)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            read_checkpoint(path, device)
            loads.append(time.perf_counter() - start)
        size = path.stat().st_size / 2**20
    print(f"checkpoint: {size:.1f} MiB, save {statistics.median(saves) * 1000:.0f} ms, "
          f"load {statistics.median(loads) * 1000:.0f} ms (median of 3)")


if __name__ == "__main__":
    main()
