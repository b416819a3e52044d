"""Training-step throughput: effcifar's step vs a plain PyTorch loop, side by side in one run.

    python bench/train_step.py                       # full width and 16/32/64/128, batch 512
    python bench/train_step.py --widths 16,32,64,128 --repeats 7

(a) effcifar: the device loader's batched augmentation + normalisation, then `TrainStep`
    (the recipe's SGD step at the device's default precision: bf16 on GPUs and on CPUs with
    AMX-BF16, else fp32); (a32) the same forced to fp32, for a like-for-like comparison.
(b) a plain loop written here: the same architecture defined independently, fp32,
    channels_last, eager, SGD Nesterov, label-smoothed cross entropy, on a ready-made batch.
Rounds alternate a, a32 and b (rotating which goes first); we report medians, the ratios a/b and a32/b, achieved GFLOP/s
(FLOPs of the step counted by torch.utils.flop_counter), the device's matmul GFLOP/s measured
in the same run in fp32 and bf16 (the practical ceilings) and augmentation time as a share of
a's step time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effcifar.data import Augment, DeviceLoader
from effcifar.models import ResNet, count_flops
from effcifar.train import TrainConfig, TrainStep, resolve_device, resolve_precision


def plain_resnet9(widths: list[int], num_classes: int = 10) -> nn.Module:
    """ResNet-9 written the plain way, independent of effcifar.models."""
    def cbr(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    class Res(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.f = nn.Sequential(*cbr(c, c), *cbr(c, c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.f(x)

    p, l1, l2, l3 = widths
    return nn.Sequential(
        *cbr(3, p),
        *cbr(p, l1), nn.MaxPool2d(2), Res(l1),
        *cbr(l1, l2), nn.MaxPool2d(2),
        *cbr(l2, l3), nn.MaxPool2d(2), Res(l3),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(l3, num_classes, bias=False),
    )


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over repeats."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured GFLOP/s of a square matmul: the practical ceiling of the device."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * size**3 / timed(lambda: a @ b, device, 10) / 1e9


def bench_widths(widths: list[int], args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Time (a), (a32) and (b) for one width setting, alternating rounds."""
    config = TrainConfig(prep=widths[0], layer1=widths[1], layer2=widths[2], layer3=widths[3],
                         batch_size=args.batch, device=str(device))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch * 4, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.batch * 4)
    loader = DeviceLoader(images, labels, batch_size=args.batch, mean=np.full(3, 125.0), std=np.full(3, 63.0),
                          device=device, augment=Augment(), shuffle=True, drop_last=True)
    raw = loader.images[: args.batch]
    y = loader.labels[: args.batch]

    def ours(precision: str):
        torch.manual_seed(0)
        model = ResNet(config.net_config(10)).to(device).to(memory_format=torch.channels_last)
        step = TrainStep(model, config, precision)

        def run() -> None:
            for _ in range(args.steps):
                step(loader.transform(raw), y, 0.01)
        return run, model

    torch.manual_seed(0)
    plain = plain_resnet9(widths).to(device).to(memory_format=torch.channels_last)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x_ready = loader.transform(raw)

    def run_plain() -> None:
        for _ in range(args.steps):
            loss = F.cross_entropy(plain(x_ready), y, label_smoothing=0.2)
            loss.backward()
            plain_opt.step()
            plain_opt.zero_grad()

    precision = resolve_precision(config.precision, device)
    run_a, model = ours(precision)
    run_a32, _ = ours("fp32")
    flops = count_flops(model, (args.batch, 3, 32, 32), backward=True)
    runs = {"a": run_a, "a32": run_a32, "b": run_plain}
    for run in runs.values():  # warm-up: allocation, kernel choice
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(args.repeats):
        for name in names[round_ % 3:] + names[: round_ % 3]:  # rotate the order: no variant always goes first
            times[name].append(timed(runs[name], device, 1) / args.steps)
    t = {name: statistics.median(v) for name, v in times.items()}
    t_aug = timed(lambda: loader.transform(raw), device, 20)
    return {"precision": precision, "a_img_s": args.batch / t["a"], "a32_img_s": args.batch / t["a32"],
            "b_img_s": args.batch / t["b"], "a_gflops": flops / t["a"] / 1e9, "a32_gflops": flops / t["a32"] / 1e9,
            "b_gflops": flops / t["b"] / 1e9, "aug_share": t_aug / t["a"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", action="append", help="prep,layer1,layer2,layer3 (repeatable)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
    settings = [[int(w) for w in s.split(",")] for s in (args.widths or ["64,128,256,512", "16,32,64,128"])]
    size = 2048 if device.type == "cpu" else 8192
    ceilings = {"fp32": matmul_gflops(device, torch.float32, size), "bf16": matmul_gflops(device, torch.bfloat16, size)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; "
          f"{args.repeats} alternating rounds of {args.steps} step(s)")
    print(f"matmul ceiling ({size}x{size}): fp32 {ceilings['fp32']:.1f} GFLOP/s, bf16 {ceilings['bf16']:.1f} GFLOP/s")
    print(f"{'widths':<16}{'prec (a)':>9}{'a img/s':>9}{'a32 img/s':>10}{'b img/s':>9}{'a/b':>7}{'a32/b':>7}"
          f"{'GFLOP/s a':>10}{'a32':>8}{'b':>8}{'a % ceil':>9}{'a32 % ceil':>11}{'b % ceil':>9}{'aug share':>10}")
    for widths in settings:
        r = bench_widths(widths, args, device)
        print(f"{'/'.join(map(str, widths)):<16}{r['precision']:>9}{r['a_img_s']:>9.1f}{r['a32_img_s']:>10.1f}"
              f"{r['b_img_s']:>9.1f}{r['a_img_s'] / r['b_img_s']:>7.2f}{r['a32_img_s'] / r['b_img_s']:>7.2f}"
              f"{r['a_gflops']:>10.1f}{r['a32_gflops']:>8.1f}{r['b_gflops']:>8.1f}"
              f"{r['a_gflops'] / ceilings[r['precision']]:>9.1%}{r['a32_gflops'] / ceilings['fp32']:>11.1%}"
              f"{r['b_gflops'] / ceilings['fp32']:>9.1%}{r['aug_share']:>10.2%}", flush=True)


if __name__ == "__main__":
    main()
