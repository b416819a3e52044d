"""One epoch of `effcifar train` against a plain PyTorch loop, each run in a process of its own.

    python bench/train_step.py                                                     # widths 16/32/64/128, 20,000 images
    python bench/train_step.py --widths 64,128,256,512 --images 5120 --precision fp32
    python bench/train_step.py --main-src /tmp/effcifar-main                       # adds today's code as a variant

malloc's settings belong to a process, so every variant runs as a child process on the same
images (a seeded subset of the training set, shuffled), network, batch and thread count:
  ours          `python -m effcifar train` as a user runs it (default environment)
  ours-system   the same with EFFCIFAR_MALLOC=system (glibc's defaults)
  ours-tunables the same with GLIBC_TUNABLES (1 GiB mmap and trim thresholds) set from outside
  main          `python -m effcifar train` of another source tree (--main-src, e.g. `git archive main`)
  plain         a loop written here: the same network defined independently, one crop offset and
                one flip per batch, no Cutout, default environment
Rounds run the variants in a rotated order. Per variant: the median train time (the epoch's
steps: summary.json's train_time, the plain loop's own clock), and the process's system time
and peak resident memory (wait4). Ratios are throughput against the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from effcifar.data import load_dataset
from effcifar.train import split_data
from measure import VARIANTS, run_measured, variant_env


def plain_resnet9(widths: list[int], num_classes: int = 10, logits_weight: float = 0.125) -> nn.Module:
    """ResNet-9 written the plain way, independent of effcifar.models."""
    def cbr(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    class Res(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.f = nn.Sequential(*cbr(c, c), *cbr(c, c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.f(x)

    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * logits_weight

    p, l1, l2, l3 = widths
    return nn.Sequential(
        *cbr(3, p),
        *cbr(p, l1), nn.MaxPool2d(2), Res(l1),
        *cbr(l1, l2), nn.MaxPool2d(2),
        *cbr(l2, l3), nn.MaxPool2d(2), Res(l3),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(l3, num_classes, bias=False), Scale(),
    )


def plain_epoch(args: argparse.Namespace) -> dict[str, float]:
    """The plain loop (child process): one epoch on the same images, then the test set once, as effcifar does."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset("cifar10")  # the copy effcifar finds: $EFFCIFAR_DATA (set by --data), else its cache
    x_train, y_train, x_test, y_test = split_data(data, args.images, 0)
    mean = torch.tensor(x_train.reshape(-1, 3).mean(0), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(x_train.reshape(-1, 3).std(0), dtype=torch.float32).view(1, 3, 1, 1)
    images = torch.from_numpy(x_train).permute(0, 3, 1, 2)  # NCHW view of the NHWC bytes
    labels = torch.from_numpy(y_train)
    model = plain_resnet9(args.widths).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def normalise(batch: torch.Tensor) -> torch.Tensor:
        return ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)

    start = time.perf_counter()
    order = torch.randperm(len(labels))
    for i in range(len(labels) // args.batch):
        index = order[i * args.batch:(i + 1) * args.batch]
        batch = F.pad(images[index].float(), (4, 4, 4, 4), mode="reflect")
        dy, dx = torch.randint(0, 9, (2,)).tolist()
        batch = batch[:, :, dy:dy + 32, dx:dx + 32]
        if torch.rand(()) < 0.5:
            batch = batch.flip(3)
        x = normalise(batch)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), labels[index], label_smoothing=0.2)
        loss.backward()
        opt.step()
        opt.zero_grad()
    train_time = time.perf_counter() - start
    model.eval()
    correct = 0
    test = torch.from_numpy(x_test).permute(0, 3, 1, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for i in range(0, len(y_test), 1024):
            correct += int((model(normalise(test[i:i + 1024])).argmax(1).numpy() == y_test[i:i + 1024]).sum())
    return {"train_time": train_time, "test_acc": correct / len(y_test)}


def run_child(variant: str, precision: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One variant in a child process: its train time and test accuracy, and what the process took."""
    out.mkdir(parents=True, exist_ok=True)
    widths = ",".join(map(str, args.widths))
    if variant == "plain":
        command = [sys.executable, __file__, "--child", "--images", str(args.images),
                   "--widths", widths, "--batch", str(args.batch), "--threads", str(args.threads),
                   "--precision", precision]
        measured = run_measured(command, out / "plain.log", variant_env("ours"))
        result = json.loads((out / "plain.log").read_text().strip().splitlines()[-1])
    else:
        command = [sys.executable, "-m", "effcifar", "train", "--dataset", "cifar10",
                   "--subset", str(args.images), "--epochs", "1", "--peak-epoch", "0.5",
                   "--batch-size", str(args.batch), "--threads", str(args.threads), "--precision", precision,
                   "--quiet", "--out", str(out / variant),
                   *[f"--{name}={w}" for name, w in zip(("prep", "layer1", "layer2", "layer3"), args.widths)]]
        measured = run_measured(command, out / f"{variant}.log", variant_env(variant, args.main_src))
        summary = json.loads((out / variant / "summary.json").read_text())
        result = {"train_time": summary["train_time"], "test_acc": summary["test_acc"]}
    return result | asdict(measured)


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a square matmul on this CPU (the practical ceiling), median of `repeats`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a local CIFAR-10 copy for every variant (default: $EFFCIFAR_DATA, else downloaded)")
    parser.add_argument("--widths", default="16,32,64,128", help="prep,layer1,layer2,layer3")
    parser.add_argument("--images", type=int, default=20000, help="training images in the epoch")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all variants")
    parser.add_argument("--variants", default="ours,ours-system,ours-tunables,plain",
                        help=f"comma-separated, of {', '.join(VARIANTS)}, plain (main needs --main-src)")
    parser.add_argument("--main-src", help="a source tree of effcifar for the variant 'main'")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.widths = [int(w) for w in args.widths.split(",")]
    if args.child:
        print(json.dumps(plain_epoch(args)))
        return
    if args.data:
        os.environ["EFFCIFAR_DATA"] = args.data  # the children's data, whichever code they run
    variants = args.variants.split(",")
    torch.set_num_threads(args.threads)
    print(f"{os.uname().nodename}: {torch.get_num_threads()} threads, torch {torch.__version__}; matmul 2048x2048 "
          f"fp32 {matmul_gflops(torch.float32):.0f} GFLOP/s, bf16 {matmul_gflops(torch.bfloat16):.0f} GFLOP/s; "
          f"widths {'/'.join(map(str, args.widths))}, {args.images} images, batch {args.batch}, {args.repeats} rounds")
    print("| precision | variant | train time (s) | rounds (s) | vs plain | process: wall (s) | system (s) | peak RSS (MB) "
          "| test acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for precision in args.precision.split(","):
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
            for round_ in range(args.repeats):
                for variant in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:
                    runs[variant].append(run_child(variant, precision, args, Path(tmp) / f"r{round_}"))
        med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
        for v, m in med.items():
            ratio = f"{med['plain']['train_time'] / m['train_time']:.2f}x" if "plain" in med else "-"
            each = " / ".join(f"{r['train_time']:.1f}" for r in runs[v])
            print(f"| {precision} | {v} | {m['train_time']:.1f} | {each} | {ratio} | {m['wall']:.1f} | {m['sys']:.1f} | "
                  f"{m['rss_mb']:.0f} | {m['test_acc']:.2%} |", flush=True)


if __name__ == "__main__":
    main()
