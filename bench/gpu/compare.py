"""On a GPU machine, in one run: our airbench recipe, its variants and the public airbench94, 5 seeds each, their runs
interleaved; then our resnet9 24-epoch recipe x5.

    python bench/gpu/compare.py --pack .cache/gpu/cifar10_jpeg.npz --reference .cache/gpu/airbench-0.1.8.tar.gz
    python bench/gpu/compare.py ... --variant "batch 512:batch_size=512"   # other variants (TrainConfig fields)
    python bench/gpu/compare.py ... --device cpu --tiny     # CPU dry run of every piece that runs without CUDA

A variant is NAME:FIELD=VALUE,... over our airbench recipe (default: DEFAULT_VARIANTS, the two largest untested
differences from airbench94, which runs without torch.compile and in fp16, where ours runs compiled in bf16 on
cards that have it; and with them the third, an experiment of this script: fp16 weights instead of autocast,
`half_weights`). Seed by seed every airbench arm runs once in turn, after one warm-up
run each, so that a drift of the shared machine reaches every arm alike.

Nothing is downloaded: the data is the shared JPEG pack, decoded here; the reference is the
PyPI sdist of airbench 0.1.8 (copied beforehand into an ignored folder), unpacked and imported from that
folder. airbench imports torchvision only for `T.Normalize` and its CIFAR download; the GPU
machine's image has no torchvision, so a two-line stand-in for Normalize is installed when it is missing,
and the decoded data is written where airbench's loader looks for it (cifar10/train.pt,
test.pt), so it never downloads. Every run trains on the same decoded images.

Times, one definition for every recipe (`profile_recipes.region_row`): airbench94's own timed
region — the whitening init, each epoch's training and the final TTA evaluation, by CUDA events —
with the evaluations between epochs outside it; after a warm-up run (resnet9: no warm-up, no
compile). Accuracy: test set, each recipe's own final TTA (ours: multi-crop for airbench, flip for
resnet9; airbench94: tta_level 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import statistics
import sys
import tarfile
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

import effcifar.train as ours_train
from effcifar.atomic import atomic_write
from effcifar.config import build_config
from effcifar.data import load_dataset
from effcifar.errors import EffcifarError
from effcifar.train import TrainConfig

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from measure import parse_variant  # noqa: E402
from profile_recipes import Regions, gpu_parser, region_row, run_ours, run_reference  # noqa: E402


def decode_pack(pack: Path, out: Path) -> Path:
    """Decode the shared JPEG pack (arrays *_jpeg, *_offsets, y_*, class_names) into a standard .npz, once."""
    if out.exists():
        return out
    from PIL import Image

    raw = np.load(pack)
    arrays = {"y_train": raw["y_train"].astype(np.int64), "y_test": raw["y_test"].astype(np.int64),
              "class_names": raw["class_names"]}
    for split in ("train", "test"):
        data, offsets = raw[f"{split}_jpeg"], raw[f"{split}_offsets"]
        arrays[f"x_{split}"] = np.stack([
            np.asarray(Image.open(io.BytesIO(data[a:b].tobytes())).convert("RGB"))
            for a, b in zip(offsets[:-1], offsets[1:])
        ])
    np.savez(out, **arrays)
    return out


def install_reference(sdist: Path, work: Path, x_train, y_train, x_test, y_test, classes) -> types.ModuleType:
    """Unpack the copied airbench sdist into `work`, import it from there, and give its loader our data."""
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    root = next(work.glob("airbench-*"))
    try:
        import torchvision  # noqa: F401  (used by airbench when present)
    except ImportError:
        sys.modules["torchvision"] = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        transforms.Normalize = lambda mean, std: (  # type: ignore[attr-defined]
            lambda x: (x - torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1))
            / torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1))
        sys.modules["torchvision.transforms"] = transforms
        sys.modules["torchvision"].transforms = transforms  # type: ignore[attr-defined]
    sys.path.insert(0, str(root))
    import airbench

    if not Path(airbench.__file__).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"airbench was imported from {airbench.__file__}, not from the copied sdist")
    (work / "cifar10").mkdir(exist_ok=True)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        torch.save({"images": torch.from_numpy(x), "labels": torch.from_numpy(y), "classes": list(classes)},
                   work / "cifar10" / f"{name}.pt")
    return airbench


def reference_run(airbench: types.ModuleType, work: Path, seed: int) -> tuple[float, float]:
    """(test accuracy, timed seconds) of one airbench94 run from the copied package, in `work`.

    train94 opens `CifarLoader('cifar10')` itself, relative to the working directory, so it runs
    from `work`, where install_reference wrote cifar10/train.pt and test.pt."""
    regions = Regions(torch.device("cuda"))
    row = region_row(run_reference(airbench, work, seed)(regions), regions)
    return row["test_acc"], row["timed_s"]


def ours_run(config: TrainConfig, data, out: Path) -> tuple[float, float]:
    """(test accuracy, timed seconds) of one of our runs; its run directory goes under `out`."""
    regions = Regions(torch.device(config.device))
    row = region_row(run_ours(config, data, out)(regions), regions)
    return row["test_acc"], row["timed_s"]


LOSS_SCALE = 1024.0  # a static loss scale for fp16 gradients: airbench94 sums its loss over the batch of 1024


@contextlib.contextmanager
def half_weights() -> Iterator[None]:
    """Our runs inside it in airbench94's arithmetic instead of autocast: the network's weights and activations in
    fp16, BatchNorm in fp32, the batches in fp16; the loss scaled by LOSS_SCALE and the gradients divided by it
    before the update (no GradScaler), the optimiser step and lookahead rebuilt over the cast weights, SGD unfused
    (torch's fused kernel is for fp32 weights, effcifar.train.FUSED_SGD_DEVICES). An experiment of this benchmark
    (the arm HALF_WEIGHTS), not a product option: it becomes one if it closes the gap."""
    original = ours_train.start_loop

    def start_loop(config: TrainConfig, data: Any) -> ours_train.Loop:
        loop = original(config, data)
        loop.model.half()
        for module in loop.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.float()
        for loader in {id(x): x for x in (loop.train_loader, loop.valid_loader, loop.test_loader)}.values():
            loader.dtype, loader.mean, loader.inv_std = torch.half, loader.mean.half(), loader.inv_std.half()
        step = loop.recipe.train_step(loop.model, "fp32")  # no autocast, no GradScaler: the network is fp16 already
        params = list(loop.model.parameters())
        step.backward = functools.partial(step.backward, weight=LOSS_SCALE)  # type: ignore[method-assign]
        step.before_update = lambda: torch._foreach_div_([p.grad for p in params if p.grad is not None], LOSS_SCALE)
        loop.step_fn = step
        return loop

    ours_train.start_loop = start_loop
    try:
        yield
    finally:
        ours_train.start_loop = original


HALF_WEIGHTS = "fp16 weights, experiment"  # the arm: precision fp16 inside half_weights()


def interleaved(arms: dict[str, Callable[[int], tuple[float, float]]], runs: int, rows: dict, table: Path,
                warmup: bool = True) -> None:
    """A warm-up run of each arm (cuDNN autotuning, torch.compile; not recorded), then seed by seed one run of each arm
    in turn; print each, and rewrite `table` (every row so far) after each, so a run stopped by a time limit keeps
    what it measured."""
    if warmup:
        for one in arms.values():
            one(100)
    for seed in range(runs):
        for name, one in arms.items():
            acc, seconds = one(seed)
            rows.setdefault(name, []).append((acc, seconds))
            atomic_write(table, json.dumps(rows, indent=2) + "\n")
            print(f"{name:<40} seed {seed}  acc {acc:.4f}  time {seconds:.2f} s", flush=True)


DEFAULT_VARIANTS = [("no compile", {"compile": "false"}), ("fp16", {"precision": "fp16"})]


def main() -> None:
    parser = gpu_parser(__doc__, ".cache/gpu/runs", "a few steps at tiny widths on 2048 images (CPU dry run)")
    parser.add_argument("--runs", type=int, default=5, help="seeds of each airbench arm (ours, variants, airbench94)")
    parser.add_argument("--resnet9-runs", type=int, default=5)
    parser.add_argument("--variant", type=parse_variant, action="append",
                        help="NAME:FIELD=VALUE,... our airbench recipe with these TrainConfig fields (repeatable; "
                             "default: 'no compile:compile=false' and 'fp16:precision=fp16')")
    parser.add_argument("--decode-only", action="store_true", help="decode the pack into WORK/cifar10.npz and stop")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    decoded = decode_pack(args.pack, args.work / "cifar10.npz")
    if args.decode_only:
        return
    common = {"device": args.device, "dataset": "cifar10"}
    if args.tiny:
        common.update(subset=2048, epochs=1, peak_epoch=0.5, layer1=8, layer2=16, layer3=16, eval_batch_size=2000)
        args.runs = args.resnet9_runs = 1
    ours = {"effcifar --recipe airbench": TrainConfig.for_recipe("airbench", **common)}
    for name, fields in args.variant or DEFAULT_VARIANTS:
        try:  # every variant checked before the first run
            ours[f"effcifar --recipe airbench ({name})"] = build_config(
                TrainConfig, None, {"recipe": "airbench", **{k: str(v) for k, v in common.items()}, **fields},
                overrides_from_text=True, override_source=f"--variant {name}")
        except EffcifarError as error:
            parser.error(str(error))
    data = load_dataset("cifar10", decoded)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {card}; torch {torch.__version__}; data {data.source}", flush=True)
    arms: dict[str, Callable[[int], tuple[float, float]]] = {
        name: (lambda s, c=config, i=i: ours_run(dataclasses.replace(c, seed=s), data, args.out / f"airbench{i}-{s}"))
        for i, (name, config) in enumerate(ours.items())}
    if not args.variant:
        half = dataclasses.replace(ours["effcifar --recipe airbench"], precision="fp16")

        def half_arm(seed: int) -> tuple[float, float]:
            with half_weights():
                return ours_run(dataclasses.replace(half, seed=seed), data, args.out / f"half-{seed}")

        arms[f"effcifar --recipe airbench ({HALF_WEIGHTS})"] = half_arm
    if device.type == "cuda" or args.reference.is_file():
        airbench = install_reference(args.reference, args.work, data.x_train, data.y_train, data.x_test, data.y_test,
                                     data.classes)
        print(f"reference airbench94 from {airbench.__file__}", flush=True)
    if device.type == "cuda":
        arms["airbench94 (airbench==0.1.8)"] = lambda s: reference_run(airbench, args.work, s)
    else:
        print("airbench94 reference: needs CUDA; not run (dry run)")
    rows: dict[str, list[tuple[float, float]]] = {}
    table = args.out / "table.json"
    args.out.mkdir(parents=True, exist_ok=True)
    interleaved(arms, args.runs, rows, table)
    resnet9 = dict(common, tta=True) if not args.tiny else dict(common, prep=8, tta=True)
    resnet9_arm = {"effcifar resnet9 (24 epochs)":
                   lambda s: ours_run(TrainConfig(seed=s, **resnet9), data, args.out / f"resnet9-{s}")}
    # no warm-up: no compile, and a 24-epoch warm-up would cost more than it settles
    interleaved(resnet9_arm, args.resnet9_runs, rows, table, warmup=False)
    print(summary_table(card, rows))


def summary_table(card: str, rows: dict[str, list[tuple[float, float]]]) -> str:
    """Mean/min/max accuracy and mean time per arm, and each time as a multiple of airbench94's (the target: <= 1.0)."""
    reference = next((runs for name, runs in rows.items() if name.startswith("airbench94")), None)
    reference_time = statistics.mean(t for _, t in reference) if reference else None
    lines = [f"\n| recipe ({card}) | runs | mean acc | min | max | mean time s | time / airbench94 |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        accs, times = zip(*runs)
        ratio = f"{statistics.mean(times) / reference_time:.2f}x" if reference_time else "n/a"
        lines.append(f"| {name} | {len(runs)} | {statistics.mean(accs):.4f} | {min(accs):.4f} | {max(accs):.4f} | "
                     f"{statistics.mean(times):.2f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
