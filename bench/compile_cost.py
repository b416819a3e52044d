"""What torch.compile costs a run of the airbench recipe: graphs compiled, first and second run's seconds.

    python bench/compile_cost.py --data .cache/cifar10.npz                 # CPU, narrow widths, 2,048 images
    python bench/compile_cost.py --data .cache/cifar10.npz --device cuda --subset 0 --widths 64,256,256

Two runs in one fresh process (seeds 0 and 1): the first pays compilation (and cuDNN autotuning on a GPU),
the second reuses the compiled graphs. Start it with an empty compile cache (`TORCHINDUCTOR_CACHE_DIR` set
to a new folder) for the time a user's very first run pays. Evaluates on the 10,000 test images, whose last
batch is short: the graphs a compiled run needs are counted over the whole run, evaluation included.
"""

from __future__ import annotations

import argparse
import json
import time

from effcifar.allocator import configure_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a decoded CIFAR-10 pack (.npz)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--subset", type=int, default=2048, help="training images (0: all)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--widths", default="16,32,32", help="layer1,layer2,layer3")
    args = parser.parse_args()
    configure_allocator()
    from torch._dynamo.utils import counters

    from effcifar.data import load_dataset
    from effcifar.train import TrainConfig, train

    data = load_dataset("cifar10", args.data)
    layer1, layer2, layer3 = (int(w) for w in args.widths.split(","))
    runs = {}
    for seed in (0, 1):
        config = TrainConfig.for_recipe(
            "airbench", device=args.device, precision=args.precision, dataset="cifar10", subset=args.subset,
            holdout=0, epochs=args.epochs, whiten_bias_epochs=max(1, args.epochs // 2), layer1=layer1,
            layer2=layer2, layer3=layer3, compile=True, seed=seed)
        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        result = train(config, data=data)
        runs[f"run {seed + 1}"] = {"seconds": round(time.perf_counter() - start, 1),
                                   "graphs compiled": counters["stats"]["unique_graphs"] - graphs,
                                   "test_acc": result.summary["test_acc"]}
    print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
