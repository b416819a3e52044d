"""Command line: argument parsing and pretty output only; the work is done by the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
)
from rich.table import Table

import effcifar
from effcifar import data as data_lib
from effcifar.config import base_type, build_config, field_types
from effcifar.errors import EffcifarError
from effcifar.train import EpochMetrics, TrainConfig, train

ALIASES = {"total_epoch": ["--epochs"]}


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --option per config field (underscores become dashes); unset options stay out of the namespace."""
    defaults = cls()
    group = parser.add_argument_group(f"{cls.__name__} fields (override --config)")
    for name, annotation in field_types(cls).items():
        kind, _ = base_type(annotation)
        flags = [f"--{name.replace('_', '-')}", *ALIASES.get(name, [])]
        default = getattr(defaults, name)
        if kind is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=f"(default: {default})")
        else:
            group.add_argument(*flags, dest=name, metavar=kind.__name__.upper(), type=str,
                               default=argparse.SUPPRESS, help=f"(default: {default})")


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build a config from --config FILE and the per-field options that were given."""
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    text_overrides = {k: v for k, v in overrides.items() if isinstance(v, str)}
    config = build_config(cls, args.config, text_overrides, overrides_from_text=True)
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if not isinstance(v, str)})


def default_run_dir(dataset: str) -> Path:
    """runs/<dataset>-<timestamp>, when --out is not given."""
    return Path("runs") / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def format_epoch(m: EpochMetrics) -> str:
    """One log line per epoch, aligned like a table."""
    return (f"epoch {m.epoch:3d}  lr {m.lr:7.4f}  train loss {m.train_loss:.3f} acc {m.train_acc:6.2%}  "
            f"valid loss {m.valid_loss:.3f} acc {m.valid_acc:6.2%}  time {m.epoch_time:6.1f}s  "
            f"total {m.total_time:7.1f}s")


def run_train(args: argparse.Namespace, console: Console) -> int:
    """effcifar train."""
    config = config_from_args(TrainConfig, args)
    out = Path(args.out) if args.out else default_run_dir(config.dataset)
    callbacks: list[Callable[[EpochMetrics], bool | None]] = []
    if args.quiet:
        result = train(config, out, callbacks=[lambda m: print(format_epoch(m), flush=True)])
    else:
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                   TimeRemainingColumn(), TextColumn("{task.description}")]
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("", total=None)

            def on_epoch(m: EpochMetrics) -> None:
                progress.console.print(format_epoch(m))
                progress.update(task, description=f"valid acc {m.valid_acc:.2%}")

            callbacks.append(on_epoch)
            result = train(config, out, callbacks=callbacks,
                           on_step=lambda done, total: progress.update(task, completed=done, total=total))
    s = result.summary
    table = Table(title=f"effcifar train: {out}", show_header=False)
    rows = [
        ("dataset", f"{s['dataset']['name']} ({s['dataset']['train_images']} train images)"),
        ("epochs", f"{s['epochs_run']}" + (" (stopped early)" if s["stopped_early"] else "")),
        ("test accuracy", f"{s['test_acc']:.2%}" + (" (flip TTA)" if config.tta else "")),
        ("best valid accuracy", f"{s['best_valid_acc']:.2%} ({s['dataset']['valid_split']})"),
        ("train time", f"{s['train_time']:.1f} s"),
        ("total time", f"{s['total_time']:.1f} s"),
        ("parameters", f"{s['params']:,}"),
        ("FLOPs / image", f"{s['flops'] / 1e6:,.1f} M"),
        ("device", f"{s['device']} · {s['precision']}"),
        ("run directory", str(out)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    return 0


def run_data(args: argparse.Namespace, console: Console) -> int:
    """effcifar data download|info|verify."""
    if args.action != "info" and args.dataset not in data_lib.ARCHIVES:
        choices = ", ".join(data_lib.ARCHIVES)
        raise EffcifarError(f"--dataset: expected one of {choices} to {args.action}, got {args.dataset!r}")
    if args.action == "download":
        columns = [TextColumn(f"[bold]{args.dataset}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("", total=None)
            path = data_lib.download(args.dataset, args.data_dir,
                                     progress=lambda done, total: progress.update(task, completed=done, total=total))
        console.print(f"{args.dataset}: {path} (md5 verified, extracted)")
    elif args.action == "verify":
        console.print(data_lib.verify(args.dataset, args.data_dir))
    else:
        dataset = data_lib.load_dataset(args.dataset, args.data_dir, download_missing=False)
        mean, std = dataset.mean_std()
        table = Table(title=f"{dataset.name}", show_header=False)
        counts = sorted({int(c) for c in np.bincount(dataset.y_train)})
        for key, value in [
            ("source", dataset.source),
            ("train / test images", f"{len(dataset.y_train)} / {len(dataset.y_test)}"),
            ("classes", f"{dataset.num_classes}: {', '.join(dataset.classes[:10])}{' …' if dataset.num_classes > 10 else ''}"),
            ("images per class (train)", f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"),
            ("coarse classes", str(len(dataset.coarse_classes)) if dataset.coarse_classes else "none"),
            ("mean (0-255)", " ".join(f"{v:.2f}" for v in mean)),
            ("std (0-255)", " ".join(f"{v:.2f}" for v in std)),
        ]:
            table.add_row(key, value)
        console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The effcifar command and its subcommands."""
    parser = argparse.ArgumentParser(prog="effcifar", description=effcifar.__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="one training run (the cifar10-fast ResNet-9 recipe by default)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML or JSON file of TrainConfig fields (e.g. a run's config.yaml or best.json)")
    p.add_argument("--out", help="run directory (default: runs/<dataset>-<time>)")
    p.add_argument("--quiet", action="store_true", help="plain log lines, no progress bar")
    add_config_options(p, TrainConfig)
    p.set_defaults(handler=run_train)

    p = sub.add_parser("data", help="download, describe or verify a dataset")
    p.add_argument("action", choices=["download", "info", "verify"])
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 (info also: synthetic, synthetic100)")
    p.add_argument("--data-dir", help="folder or file; default $EFFCIFAR_DATA, then ~/.cache/effcifar")
    p.set_defaults(handler=run_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn our errors into one line on stderr."""
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return args.handler(args, console)
    except EffcifarError as e:
        print(f"effcifar {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"effcifar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
