"""Recipes at an equal wall-clock budget: airbench vs resnet9 on real CIFAR-10, and airbench's ablations.

    EFFCIFAR_DATA=.cache/cifar10.npz python bench/recipes.py                      # 240 s a run, seeds 0,1
    python bench/recipes.py --budget 240 --seeds 0,1 --ablation-budget 90
    python bench/recipes.py --no-main --ablation-budget 60                        # ablations only

Equal budget: before each run, the recipe's training step is timed for a few steps (after a
warm-up) at its batch size, widths and precision, and its schedule is sized to the number of
whole epochs whose steps fit in the budget (times 0.95 for noise); the schedule's epoch-valued
settings (peak_epoch; airbench's whitening-bias epochs) scale with it. Then it trains and is
evaluated on the full test set (evaluation is not part of the budget, as DAWNBench). Each
recipe keeps its own published methods (resnet9: batch 512, Cutout, flip TTA; airbench: all of
its methods) at the narrow widths given. Runs alternate airbench / resnet9 within each seed so
that the machine's noise falls on both alike. Ablations: airbench with one method off at a
time, seed `--ablation-seed`, at `--ablation-budget`, each with its own sized schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from typing import Any

import torch

from effcifar.data import CifarData, load_dataset
from effcifar.device import resolve_device, resolve_precision
from effcifar.train import TrainConfig, train

# name -> the fields that switch one airbench method off
ABLATIONS: dict[str, dict[str, Any]] = {
    "no whitening (trainable 2x2 conv)": {"whiten": False},
    "no identity init": {"identity_init": False},
    "no label smoothing": {"label_smoothing": 0.0},
    "no lookahead": {"lookahead": False},
    "random flip (no alternating)": {"alt_flip": False},
    "mirror TTA only (no multi-crop)": {"multicrop_tta": False},
    "BN bias LR x1 (not x64)": {"bn_bias_lr": 1.0},
    "batch 512 (not 1024)": {"batch_size": 512},
}


class _ProbeDone(Exception):
    """Raised from the step hook to end a timing probe."""


def seconds_per_step(config: TrainConfig, data: CifarData, warmup: int, steps: int) -> float:
    """Time `steps` training steps of the real run (after `warmup` steps), then abort it."""
    stamps: list[float] = []

    def hook(done: int, total: int) -> None:
        stamps.append(time.perf_counter())
        if done == warmup + steps:
            raise _ProbeDone

    try:
        train(config, data=data, on_step=hook)
    except _ProbeDone:
        pass
    return (stamps[-1] - stamps[warmup - 1]) / steps


def sized_to_budget(config: TrainConfig, data: CifarData, budget: float, args: argparse.Namespace) -> TrainConfig:
    """The config with its schedule stretched or compressed to the whole epochs that fit in `budget` seconds."""
    step_s = seconds_per_step(config, data, args.warmup_steps, args.probe_steps)
    epoch_s = step_s * (len(data.y_train) // config.batch_size)
    epochs = max(1, math.floor(0.95 * budget / epoch_s))
    scale = epochs / config.epochs
    changes: dict[str, Any] = {"epochs": epochs, "peak_epoch": config.peak_epoch * scale}
    if config.recipe == "airbench":
        own = config.recipe_fields
        changes["recipe_fields"] = dataclasses.replace(own, whiten_bias_epochs=max(1, round(own.whiten_bias_epochs
                                                                                           * scale)))
    print(f"  probe: {step_s:.3f} s/step, {epoch_s:.1f} s/epoch -> {epochs} epochs", flush=True)
    return dataclasses.replace(config, **changes)


def recipe_config(recipe: str, widths: list[int], seed: int, args: argparse.Namespace, **fields: Any) -> TrainConfig:
    """The recipe's config (its defaults) at the given widths (resnet9: 4, airbench: 3)."""
    names = ["prep", "layer1", "layer2", "layer3"][-len(widths):]
    common = dict(dataset=args.dataset, seed=seed, threads=args.threads, **dict(zip(names, widths)))
    if recipe == "resnet9":
        common["tta"] = True  # flip TTA, as bench/accuracy.py
    return TrainConfig.for_recipe(recipe, **common, **fields)


def run(name: str, config: TrainConfig, data: CifarData, budget: float, args: argparse.Namespace) -> dict[str, Any]:
    """Size, train and evaluate one run; print and return its row."""
    print(f"{name} (seed {config.seed}):", flush=True)
    sized = sized_to_budget(config, data, budget, args)
    s = train(sized, data=data).summary
    row = {"name": name, "seed": config.seed, "epochs": sized.epochs, "acc": s["test_acc"],
           "train_s": s["train_time"], "total_s": s["total_time"]}
    print(f"  {name:<36} seed {row['seed']}  epochs {row['epochs']:>3}  test acc {row['acc']:.2%}  "
          f"train {row['train_s']:.1f} s  total {row['total_s']:.1f} s", flush=True)
    return row


def main_table(data: CifarData, args: argparse.Namespace) -> list[dict[str, Any]]:
    """airbench and resnet9 alternating, each seed, at `--budget`."""
    rows = []
    for seed in args.seeds:
        rows.append(run("airbench", recipe_config("airbench", args.airbench_widths, seed, args), data, args.budget, args))
        rows.append(run("resnet9", recipe_config("resnet9", args.resnet9_widths, seed, args), data, args.budget, args))
    return rows


def ablation_table(data: CifarData, args: argparse.Namespace) -> list[dict[str, Any]]:
    """airbench in full, then with each method off in turn, at `--ablation-budget`."""
    variants = {"airbench (all methods)": {}, **ABLATIONS}
    return [run(name, recipe_config("airbench", args.airbench_widths, args.ablation_seed, args, **off), data,
                args.ablation_budget, args) for name, off in variants.items()]


def widths(text: str) -> list[int]:
    """'16,32,64,128' -> [16, 32, 64, 128]."""
    return [int(w) for w in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per run, main table")
    parser.add_argument("--ablation-budget", type=float, default=90.0, help="training seconds per ablation run")
    parser.add_argument("--seeds", type=widths, default=[0, 1])
    parser.add_argument("--ablation-seed", type=int, default=0)
    parser.add_argument("--resnet9-widths", type=widths, default=[16, 32, 64, 128], help="prep,layer1,layer2,layer3")
    parser.add_argument("--airbench-widths", type=widths, default=[32, 64, 128], help="layer1,layer2,layer3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--probe-steps", type=int, default=6)
    parser.add_argument("--main", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    device = resolve_device("auto")
    print(f"{args.dataset} from {data.source}; device {device}, precision {resolve_precision('auto', device)}, "
          f"{args.threads} threads, torch {torch.__version__}; resnet9 widths {args.resnet9_widths}, "
          f"airbench widths {args.airbench_widths}", flush=True)
    if args.main:
        rows = main_table(data, args)
        print(f"\nmain table: budget {args.budget:.0f} s of training per run")
        print("| recipe | seed | epochs | test acc | train s | total s |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['seed']} | {r['epochs']} | {r['acc']:.2%} | {r['train_s']:.1f} | {r['total_s']:.1f} |")
        medians = {n: statistics.median(r["acc"] for r in rows if r["name"] == n) for n in ("airbench", "resnet9")}
        gap = 100 * (medians["airbench"] - medians["resnet9"])
        print(f"median test acc: airbench {medians['airbench']:.2%}, resnet9 {medians['resnet9']:.2%}, "
              f"gap {gap:+.2f} points (target >= +3)")
    if args.ablation:
        rows = ablation_table(data, args)
        base = rows[0]["acc"]
        print(f"\nablations: budget {args.ablation_budget:.0f} s of training per run, seed {args.ablation_seed}")
        print("| variant | epochs | test acc | vs all methods | train s |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['epochs']} | {r['acc']:.2%} | {100 * (r['acc'] - base):+.2f} | {r['train_s']:.1f} |")


if __name__ == "__main__":
    main()
