"""Accuracy on a short budget: the recipe at narrow widths on real CIFAR-10, precisions side by side.

    EFFCIFAR_DATA=.cache/cifar10.npz python bench/accuracy.py            # 16/32/64/128, 3 epochs
    python bench/accuracy.py --epochs 3 --seeds 0,1 --precisions auto,fp32

Each run: batch 512, the cifar10-fast recipe with the schedule compressed to `--epochs`
(peak at `--peak-epoch`), flip TTA at evaluation, `--threads` CPU threads. Runs of the
different precisions alternate, so machine noise falls on all of them alike.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from effcifar.data import load_dataset
from effcifar.device import resolve_device, resolve_precision
from effcifar.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--widths", default="16,32,64,128", help="prep,layer1,layer2,layer3")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--peak-epoch", type=float, default=1.0)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--precisions", default="auto,fp32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    data = load_dataset(args.dataset)
    prep, layer1, layer2, layer3 = (int(w) for w in args.widths.split(","))
    device = resolve_device("auto")
    results: dict[str, list[tuple[float, float]]] = {}
    print(f"{args.dataset} from {data.source}; widths {args.widths}; {args.epochs} epochs; batch 512; flip TTA; "
          f"device {device}; {args.threads} threads; torch {torch.__version__}")
    print(f"{'precision':<10}{'seed':>5}{'test acc':>10}{'train s':>9}{'total s':>9}")
    for seed in (int(s) for s in args.seeds.split(",")):
        for precision in args.precisions.split(","):
            config = TrainConfig(dataset=args.dataset, prep=prep, layer1=layer1, layer2=layer2, layer3=layer3,
                                 epochs=args.epochs, peak_epoch=args.peak_epoch, tta=True,
                                 precision=precision, seed=seed, threads=args.threads)
            s = train(config, data=data).summary
            name = f"{precision}={resolve_precision(precision, device)}" if precision == "auto" else precision
            results.setdefault(name, []).append((s["test_acc"], s["train_time"]))
            print(f"{name:<10}{seed:>5}{s['test_acc']:>10.2%}{s['train_time']:>9.1f}{s['total_time']:>9.1f}", flush=True)
    print("summary (median over seeds):")
    for name, runs in results.items():
        accs, times = zip(*runs)
        print(f"  {name:<10} test acc {statistics.median(accs):.2%} (min {min(accs):.2%}, max {max(accs):.2%}), "
              f"train time {statistics.median(times):.1f} s")


if __name__ == "__main__":
    main()
