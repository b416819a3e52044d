"""Command line: argument parsing and pretty output only; the work is done by the Python API."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
import yaml
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

import effcifar
from effcifar import data as data_lib
from effcifar.allocator import configure_allocator
from effcifar.atomic import atomic_write
from effcifar.config import (
    base_type, build_config, build_from_layers, field_help, field_types, group_fields, read_config_file, read_json,
    renamed_fields, warn_deprecated,
)
from effcifar.errors import ConfigError, EffcifarError, Interrupted
from effcifar.nas.supernet import SupernetConfig
from effcifar.rundir import files as rundir_files, locked, recorded_kind, replacing
from effcifar.train import EpochMetrics, TrainConfig, recipe_fields_classes, train

NAS_EVAL_TRIALS = 20  # subnets trained standalone by nas-eval
TABLE_SAMPLE = 300  # table architectures scored by nas-eval --table (a tau over 300 has a standard error near 0.04)
HPO_OWN_OPTIONS = {"base", "timeout"}  # HpoConfig fields that `hpo run` takes as --config and a duration
HPO_TRIAL_EXCLUDED = {"dataset", "space"}  # TrainConfig fields whose names are HpoConfig's (--dataset: both)
NOTES = {"epochs": "; given without --peak-epoch, the peak (and airbench's whiten_bias_epochs) keeps its "
                   "fraction of the run"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if action.default is None or "(default" in text else super()._get_help_string(action)


class DeprecatedOption(argparse.Action):
    """An option's old name: sets the new one's value, with a one-line warning (once per name) on stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warn_deprecated(f"option {option_string}", self.new)
        setattr(namespace, self.dest, values)


def add_deprecated_option(parser: Any, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """`old` as a hidden alias of the option `new` (kept for a release; not in --help)."""
    parser.add_argument(old, dest=dest, action=DeprecatedOption, new=new, help=argparse.SUPPRESS, **kwargs)


def add_config_options(parser: argparse.ArgumentParser, cls: type, exclude: Collection[str] = (),
                       title: str | None = None, old_names: bool = True) -> None:
    """One --option per config field but `exclude` (underscores become dashes), its help from the field's
    metadata (`effcifar.config.setting`); unset options stay out of the namespace. A `nested` group's keys
    (SupernetConfig's sampler, ...) and TrainConfig's recipe fields (one group per recipe) come after the
    class's own. With `old_names`, the class's renamed fields (`RENAMED_FIELDS`) keep their old options as
    hidden aliases."""
    defaults = cls()
    group = parser.add_argument_group(title or f"{cls.__name__} fields (override --config)")
    helps = {f.name: field_help(f) for f in dataclasses.fields(cls)}
    for name, annotation in field_types(cls).items():
        if name in exclude or name not in helps or annotation is dict:  # recipe fields and old names: below, none
            continue
        kind, _ = base_type(annotation)
        flags = [f"--{name.replace('_', '-')}"]
        default = "" if "default" in helps[name] else f" (default: {getattr(defaults, name)})"
        note = NOTES.get(name, "") if issubclass(cls, TrainConfig) else ""  # TrainConfig's epochs, not a supernet's
        text = f"{helps[name]}{note}{default}".replace("%", "%%")
        if kind is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(*flags, dest=name, metavar=kind.__name__.upper(), type=str,
                               default=argparse.SUPPRESS, help=text)
    for old, new in renamed_fields(cls).items() if old_names else ():
        if new not in exclude:
            add_deprecated_option(group, f"--{old.replace('_', '-')}", f"--{new.replace('_', '-')}", new,
                                  default=argparse.SUPPRESS)
    for field, group_class in group_fields(cls):
        add_config_options(parser, group_class, exclude, f"{field.name}: {field_help(field)}")
    if cls is TrainConfig:
        for recipe, fields_class in recipe_fields_classes().items():
            add_config_options(parser, fields_class, exclude, f"recipe {recipe} only (with --recipe {recipe})")


def config_from_args(cls: type, args: argparse.Namespace, load: Callable[..., Any] | None = None) -> Any:
    """Build a config from --config FILE and the per-field options that were given.

    `load(file, overrides, overrides_from_text=True)` builds it (default: `build_config(cls, ...)`).
    """
    names = set(field_types(cls))
    overrides = {k: v for k, v in vars(args).items() if k in names}  # text, and typed flags (True/False)
    load = load or functools.partial(build_config, cls)
    return load(args.config, overrides, overrides_from_text=True)


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
    made_by_train = recorded_kind(out) == "train"  # before `locked` records a kind in a directory that has none
    with locked(out, "train"):  # held from the check to the end of the run (train takes it again)
        if rundir_files(out):
            if not made_by_train:  # a folder of the user's own: --overwrite replaces training runs only
                raise EffcifarError(f"{out}: holds files that are not a training run; choose another --out")
            if not args.overwrite:
                what = "an unfinished run" if not (out / "summary.json").is_file() else "a run already"
                raise EffcifarError(f"{out}: holds {what} (a training run does not resume); choose another "
                                    f"--out, or add --overwrite to replace it")
            with replacing(out):  # the old run stays if the new one fails
                return train_and_show(config, out, args, console)
        return train_and_show(config, out, args, console)


def train_and_show(config: TrainConfig, out: Path, args: argparse.Namespace, console: Console) -> int:
    """The run of `effcifar train` into `out` (locked), with its progress and its summary table."""
    callbacks: list[Callable[[EpochMetrics], bool | None]] = []
    if args.quiet:
        result = train(config, out, callbacks=[lambda m: print(format_epoch(m), flush=True)])
    else:
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                   TimeRemainingColumn(), TextColumn("{task.description}")]
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
            task = progress.add_task("", total=None)

            def on_epoch(m: EpochMetrics) -> None:
                progress.console.print(format_epoch(m), soft_wrap=True)
                progress.update(task, description=f"valid acc {m.valid_acc:.2%}")

            callbacks.append(on_epoch)
            result = train(config, out, callbacks=callbacks,
                           on_step=lambda done, total: progress.update(task, completed=done, total=total))
    s = result.summary
    table = Table(title=f"effcifar train: {out}", show_header=False)
    rows = [
        ("dataset", f"{s['dataset']['name']} ({s['dataset']['train_images']} train images)"),
        ("epochs", f"{s['epochs_run']}" + (" (stopped early)" if s["stopped_early"] else "")),
        ("test accuracy", f"{s['test_acc']:.2%}" + (f" ({s['test_tta']} TTA)" if s["test_tta"] else "")),
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
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
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


def run_hpo(args: argparse.Namespace, console: Console) -> int:
    """effcifar hpo run|status|best|export."""
    from effcifar.hpo import study as hpo  # optuna is imported only by the commands that need it

    if args.action == "run":
        return run_hpo_study(args, console, hpo)
    if args.action == "best":
        path, best = hpo.write_best(args.run, args.tie, args.storage)
        config, study = hpo.load_run(args.run, args.storage)
        print_best(study, best, config.tie if args.tie is None else args.tie, path, console, hpo)
    elif args.action == "export":
        for path in hpo.export_trials(args.run, args.storage):
            console.print(f"wrote {path}")
    else:
        config, study = hpo.load_run(args.run, args.storage)
        print_study(study, config.tie, console, hpo)
    return 0


def hpo_config_from_args(args: argparse.Namespace,
                         hpo: Any) -> tuple[Any, dict[str, Any] | None, TrainConfig | None, list[str]]:
    """(config, inline space, base, warnings): --experiment (NNI experiment file) < options; the trials' base is
    --config (a TrainConfig file) with the TrainConfig options over it, None when no option changes the file.

    An inline NNI space is checked here and written into the run directory by `run_study`. The warnings
    (ignored keys, old names) are shown once every check has passed, so that a refused command prints
    its error alone.
    """
    from effcifar.hpo.experiment import load_experiment, parse_duration
    from effcifar.hpo.space import trial_space

    warnings: list[str] = []
    if args.config is not None and args.experiment is None and is_experiment(read_config_file(args.config)):
        warnings.append(f"{args.config}: an NNI experiment config: pass it with --experiment (--config now takes "
                        "the trials' base config)")
        args.experiment, args.config = args.config, None
    if args.base is not None:
        warnings.append("--base is deprecated: use --config (any run's config.yaml or an HPO best.json)")
        args.config = args.config or args.base
    layers: list[tuple[str, dict[str, Any], bool]] = []
    inline = None
    if args.experiment:
        values: dict[str, Any] = {}
        exp = load_experiment(args.experiment)
        warnings += [f"{args.experiment}: {warning}" for warning in exp.warnings]
        if exp.search_space is None and exp.search_space_file is None and getattr(args, "space", None) is None:
            raise ConfigError(f"{args.experiment}: no search space (expected searchSpaceFile, searchSpacePath or "
                              f"searchSpace; NNI annotations in trial code are not read), or give --space FILE")
        if getattr(args, "space", None) is not None:  # --space wins over the file's space, inline or not
            pass
        elif exp.search_space is not None:  # an inline v2 space: kept in the run directory
            inline = exp.search_space
            trial_space(inline, f"{args.experiment}: key 'searchSpace'")
            values["space"] = str(Path(args.out) / hpo.SPACE_FILE)
        elif exp.search_space_file is not None:
            values["space"] = exp.search_space_file
        values.update({k: v for k, v in {"trials": exp.trials, "timeout": exp.timeout, "workers": exp.workers,
                                           "sampler": exp.sampler, "sampler_seed": exp.seed, "study": exp.name}.items()
                       if v is not None})
        layers.append((args.experiment, values, False))
    names = {f.name for f in dataclasses.fields(hpo.HpoConfig)} - HPO_OWN_OPTIONS
    given = {k: v for k, v in vars(args).items() if k in names} | ({"base": args.config} if args.config else {})
    if args.timeout is not None:
        given["timeout"] = parse_duration(args.timeout, "--timeout")
    layers.append(("command line", {k: v for k, v in given.items() if isinstance(v, str)}, True))
    layers.append(("command line", {k: v for k, v in given.items() if not isinstance(v, str)}, False))
    config = build_from_layers(hpo.HpoConfig, layers)
    if getattr(args, "holdout", None) == "0" and not config.select_on_test:
        raise ConfigError("--holdout 0: trials would validate, and the best be chosen, on the test set; "
                          "add --select-on-test to mean it")
    trial_options = {k: v for k, v in vars(args).items() if k in set(field_types(TrainConfig)) - HPO_TRIAL_EXCLUDED}
    base = config_from_args(TrainConfig, argparse.Namespace(config=args.config, **trial_options)) \
        if trial_options else None
    return config, inline, base, warnings


def is_experiment(data: dict[str, Any]) -> bool:
    """Whether a config file's keys are an NNI experiment's rather than TrainConfig fields."""
    return bool(data) and not set(data) & set(field_types(TrainConfig))


def console_warning(message: str) -> None:
    """A warning line on stderr."""
    print(f"effcifar: warning: {message}", file=sys.stderr)


def run_hpo_study(args: argparse.Namespace, console: Console, hpo: Any) -> int:
    """effcifar hpo run: start or resume a study, a line per trial and its table at the end.

    A study that failed trials ended (or that completed none) exits non-zero with the first failure's reason.
    """
    config, inline_space, base, warnings = hpo_config_from_args(args, hpo)
    start = hpo.trial_config(config, {}, 0, base)

    def on_start() -> None:  # once every check has passed: a refused command prints its error alone
        for warning in warnings:
            console_warning(warning)
        if start.holdout:
            console.print(f"trials validate on {start.holdout} held-out training images (holdout)")
        else:
            console_warning("trials validate on the test set (--select-on-test): the best is chosen on test images, "
                            "so its test accuracy is no longer an unbiased estimate")

    def on_trial(t: Any) -> None:
        a = t.user_attrs
        detail = a.get("fail_reason") or (f"valid acc {a['accuracy']:.2%}  work {format_work(a.get('work'))}  "
                                          f"train time {a['train_time']:.1f} s" if "accuracy" in a else "")
        console.print(f"trial {t.number:4d}  {t.state.name:<8}  {format_params(hpo.trial_values(t))}  {detail}",
                      markup=False, soft_wrap=True)

    try:
        study = hpo.run_study(config, args.out, on_trial=on_trial, inline_space=inline_space, base=base,
                              on_start=on_start)
    except hpo.TrialsFailed:
        print_study(hpo.load_run(args.out, config.storage)[1], config.tie, console, hpo)
        raise
    print_study(study, config.tie, console, hpo)
    return 0


def format_params(params: dict[str, Any]) -> str:
    """A trial's sampled values, compactly: peak_lr=0.31 cutout=8."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def format_work(work: float | None) -> str:
    """Training work (FLOPs per image x training images x epochs) in G, T or P FLOP."""
    if work is None:
        return "?"
    scale, unit = next(((s, u) for s, u in ((1e15, "P"), (1e12, "T")) if work >= s), (1e9, "G"))
    return f"{work / scale:.3g} {unit}FLOP"


def print_study(study: Any, tie: float, console: Console, hpo: Any, top: int = 10) -> None:
    """Counts by state and a table of the top trials by accuracy with their sampled values, marking the one the
    tie rule picks."""
    trials = study.get_trials(deepcopy=False)
    counts = collections.Counter(t.state.name for t in trials)
    console.print(f"study {study.study_name}: {len(trials)} trials (" +
                  ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) + ")")
    ranked = sorted((t for t in trials if t.user_attrs.get("accuracy") is not None),
                    key=lambda t: -t.user_attrs["accuracy"])[:top]
    if not ranked:
        return
    chosen = hpo.select_best(trials, tie).number if counts.get("COMPLETE") else None
    if len(study.directions) == 2 and counts.get("COMPLETE"):
        front = sorted(t.number for t in study.best_trials)
        console.print(f"Pareto front (accuracy vs train time): trials {', '.join(map(str, front))}")
    table = Table(title=f"top {len(ranked)} trials (* = best by the tie rule: least work within {tie} points)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("trial", "state", "sampled values", "valid acc", "work", "train time", "epochs", "params"):
        table.add_column(column, justify="left" if column == "sampled values" else "right",
                         no_wrap=column in ("sampled values", "work"))
    for t in ranked:
        r = hpo.trial_record(t)
        values = format_params(hpo.trial_values(t))
        table.add_row(f"{r['number']}{'*' if r['number'] == chosen else ''}", r["state"], values,
                      f"{r['accuracy']:.2%}", format_work(r["work"]) if r["work"] else "",
                      "" if r["train_time"] is None else f"{r['train_time']:.1f} s",  # a cut trial has no time
                      str(r["epochs"] or ""), f"{r['params']:,}" if r["params"] else "")
    console.print(table)


def print_best(study: Any, best: Any, tie: float, path: Path, console: Console, hpo: Any) -> None:
    """The tie rule's pick and Optuna's best_trial (the highest accuracy), and why they differ when they do."""
    def line(t: Any) -> str:
        a = t.user_attrs
        return (f"trial {t.number} ({format_params(hpo.trial_values(t))}): valid acc {a['accuracy']:.2%}, "
                f"work {format_work(a.get('work'))}, train time {a['train_time']:.1f} s")

    console.print(f"best by the tie rule: {line(best)} -> {path}", markup=False, soft_wrap=True)
    if len(study.directions) != 1:
        return
    optuna_best = study.best_trial
    if optuna_best.number == best.number:
        console.print("Optuna's best_trial is the same trial", markup=False)
        return
    ratio = best.user_attrs.get("work", 0) / optuna_best.user_attrs.get("work", float("nan"))
    console.print(f"Optuna's best_trial: {line(optuna_best)}; the tie rule prefers trial {best.number}: within "
                  f"{tie} points of its accuracy with {ratio:.2f}x its training work", markup=False, soft_wrap=True)


def run_dashboard(args: argparse.Namespace, console: Console) -> int:
    """effcifar dashboard: serve the run's study in Optuna's web dashboard until Ctrl-C."""
    from effcifar.dashboard import serve_dashboard  # optuna-dashboard only for this command

    serve_dashboard(args.run, host=args.host, port=args.port, storage=args.storage, allow_network=args.allow_network,
                    warn=console_warning,
                    on_ready=lambda url: console.print(f"dashboard of {args.run}: {url} (Ctrl-C stops it)",
                                                       markup=False, soft_wrap=True))
    return 0


def run_supernet(args: argparse.Namespace, console: Console) -> int:
    """effcifar supernet train|space."""
    from effcifar.nas import space as space_lib, supernet, trainer

    if args.action == "space":
        space = space_lib.ArchSpace.load(args.space)
        table = Table(title=f"architecture space ({args.space}): {space.size():,} paths")
        table.add_column("choice key")
        table.add_column("candidates")
        for key, candidates in space.choices().items():
            table.add_row(key, ", ".join(candidates))
        console.print(table)
        if args.export:
            atomic_write(args.export, space_lib.nni_space_json(space))
            console.print(f"wrote {args.export} (NNI search-space JSON)")
        if args.declaration:
            atomic_write(args.declaration, yaml.safe_dump(space.to_dict(), sort_keys=False, default_flow_style=None, width=120))
            console.print(f"wrote {args.declaration} (space declaration; edit it and pass --space)")
        return 0
    out = Path(args.out)
    if args.resume and args.config is None and (out / "config.yaml").exists():
        args.config = str(out / "config.yaml")  # resume with the run's own config unless told otherwise
    config = config_from_args(supernet.SupernetConfig, args, supernet.load_config)
    if args.quiet:
        result = trainer.train_supernet(config, out, resume=args.resume, warn=console_warning,
                                        on_epoch=lambda row: print(format_supernet_epoch(row), flush=True))
    else:
        columns = [TextColumn("[bold]supernet {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("steps"), TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
            task = progress.add_task("", total=None, epoch="")

            def on_step(epoch: int, step: int, steps: int) -> None:
                progress.update(task, completed=step, total=steps, epoch=f"epoch {epoch}/{config.epochs}")

            result = trainer.train_supernet(
                config, out, resume=args.resume, warn=console_warning, on_step=on_step,
                on_epoch=lambda row: progress.console.print(format_supernet_epoch(row), soft_wrap=True),
            )
    s = result.summary
    table = Table(title=f"effcifar supernet train: {out}", show_header=False)
    for key, value in [
        ("dataset", f"{s['dataset']['name']} ({s['dataset']['train_images']} train, {s['dataset']['valid_images']} held out)"),
        ("epochs", str(s["epochs"])),
        ("final panel (valid acc)", ", ".join(f"{k[6:]} {v:.2%}" for k, v in s["final_panel"].items())),
        ("space", f"{s['space_size']:,} paths" + (f" after {len(result.shrink_log)} shrink steps" if result.shrink_log else "")),
        ("train time", f"{s['train_time']:.1f} s"),
        ("device", f"{s['device']} · {s['precision']} · {s['processes']} process(es)"),
        ("supernet", str(out / "supernet.pt")),
    ]:
        table.add_row(key, value)
    console.print(table)
    return 0


def format_supernet_epoch(row: dict[str, Any]) -> str:
    """One log line per supernet epoch: training figures and the reference panel."""
    randoms = [v for k, v in row.items() if k.startswith("valid_random")]
    random_text = f"  random mean {sum(randoms) / len(randoms):6.2%}" if randoms else ""
    return (f"epoch {row['epoch']:3d}  lr {row['lr']:7.4f}  train loss {row['train_loss']:.3f} acc {row['train_acc']:6.2%}  "
            f"valid largest {row['valid_largest']:6.2%} smallest {row['valid_smallest']:6.2%}{random_text}  "
            f"space {row['space_size']:,}  time {row['epoch_time']:6.1f}s")



def run_search(args: argparse.Namespace, console: Console) -> int:
    """effcifar search: architecture search over a trained supernet; the top K are exported and tabulated."""
    from effcifar.nas import search
    from effcifar.nas.latency import LATENCY_FILE, LatencyTable

    config = config_from_args(search.SearchConfig, args)

    def on_trial(t: Any) -> None:
        a = t.user_attrs
        latency = f"  {a['latency_ms']:.3f} ms" if "latency_ms" in a else ""
        loss = f"loss {a['loss']:.4f}  " if config.score == "loss" and a.get("loss") is not None else ""
        detail = a.get("fail_reason") or (f"held out: {loss}acc {a['accuracy']:.2%}  top-5 {a['top5']:.2%}  "
                                          f"{a['flops'] / 1e6:,.1f} MFLOPs{latency}"
                                          + ("  (cached)" if a.get("cached") else "") if "accuracy" in a else "")
        console.print(f"trial {t.number:4d}  {t.state.name:<8}  {detail}")

    study = search.run_search(config, args.supernet, args.out, on_trial=None if args.quiet else on_trial)
    latency = LatencyTable.load(Path(args.out) / LATENCY_FILE) if config.needs_latency() else None
    exported = [Path(args.out) / "arch" / f"top_{rank}.json" for rank in range(1, config.export + 1)]
    records = [read_json(path) for path in exported if path.is_file()]  # as run_search wrote them, within the limits
    by_loss = config.score == "loss"
    table = Table(title=f"effcifar search ({config.strategy}): best {len(records)} of {len(study.trials)} trials, "
                        f"ranked by held-out {'loss (lower is better)' if by_loss else 'accuracy'} after BN "
                        f"recalibration")
    columns = ["rank", "trial", *(["loss"] if by_loss else []), "top-1", "top-5", "MFLOPs", "params",
               *(["ms"] if latency else [])]
    for column in [*columns, "architecture (active choices)"]:
        table.add_column(column, justify="left" if column.startswith("arch") else "right")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for r in records:
        ms = [f"{r['latency_ms']:.3f}"] if latency else []
        loss = [f"{-r['score']:.4f}"] if by_loss else []
        table.add_row(str(r["rank"]), str(r["trial"]), *loss, f"{r['accuracy']:.2%}", f"{r['top5']:.2%}",
                      f"{r['flops'] / 1e6:,.1f}", f"{r['params']:,}", *ms,
                      trials[r["trial"]].user_attrs["arch_key"].replace(",", " "))
    console.print(table)
    if latency:
        console.print(latency.summary(), markup=False)
    if len(study.directions) == 2 and records:
        front = sorted(t.number for t in study.best_trials)
        console.print(f"Pareto front ({'held-out loss' if by_loss else 'accuracy'} vs {config.cost}): trials "
                      f"{', '.join(map(str, front))}")
    console.print(f"wrote {Path(args.out) / 'arch'}/top_1..{len(records)}.json and "
                  f"{Path(args.out) / 'architecture_final.json'}")
    return 0


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig options given on the command line (text, as typed)."""
    names = set(field_types(TrainConfig))
    return {k: v for k, v in vars(args).items() if k in names}


def run_retrain(args: argparse.Namespace, console: Console) -> int:
    """effcifar retrain: train the search's best N from scratch; table of supernet vs standalone accuracy."""
    from effcifar.nas import retrain

    supernet_dir = retrain.search_supernet_dir(args.search)
    base = retrain.base_config(supernet_dir, args.config, train_overrides(args), overrides_from_text=True)
    out = Path(args.out) if args.out else Path(args.search) / "retrain"
    rows = retrain.retrain_top(args.search, args.best, out, base,
                               progress=lambda text: console.print(text, markup=False))
    table = Table(title=f"effcifar retrain: best {len(rows)} of {args.search}, {base.epochs} epochs")
    holdout = "standalone_holdout_acc" in rows[0]
    loss = any(isinstance(r["supernet_loss"], float) for r in rows)  # searches that recorded losses rank by them
    columns = ["rank", "trial", *(["supernet loss (held out)"] * loss), "supernet (held out)", "standalone test",
               *(["standalone held out"] * holdout), "params", "MFLOPs", "train time"]
    for column in columns:
        table.add_column(column, justify="right")
    percent = lambda v: f"{v:.2%}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in rows:
        losses = [f"{r['supernet_loss']:.4f}" if isinstance(r["supernet_loss"], float) else "—"] * loss
        table.add_row(str(r["rank"]), str(r["trial"]), *losses, percent(r["supernet_acc"]),
                      percent(r["standalone_test_acc"]),
                      *([percent(r["standalone_holdout_acc"])] * holdout), f"{r['params']:,}",
                      f"{r['flops'] / 1e6:,.1f}", f"{r['train_time']:.1f} s")
    console.print(table)
    console.print(f"wrote {out / 'retrain.json'} and {out / 'retrain.tsv'}", markup=False)
    return 0


def run_select(args: argparse.Namespace, console: Console) -> int:
    """effcifar select: the search's proposals and the incumbent trained at rising fidelity; the held-out best wins."""
    from effcifar.nas import retrain, select

    base = retrain.base_config(retrain.search_supernet_dir(args.search), args.config, train_overrides(args),
                               overrides_from_text=True)
    names = {f.name for f in dataclasses.fields(select.SelectConfig)}
    config = build_config(select.SelectConfig, None, {k: v for k, v in vars(args).items() if k in names},
                          overrides_from_text=True)
    out = Path(args.out) if args.out else Path(args.search) / "select"

    def on_trial(t: Any) -> None:
        a = t.user_attrs
        accuracies = " ".join(f"{v:.2%}" for v in a.get("accuracies", []))
        detail = a.get("fail_reason") or f"held out by epoch: {accuracies}"
        console.print(f"{t.params.get('candidate', '?'):<12} {t.state.name.lower():<9} {detail}", markup=False)

    if args.front:
        try:
            limits = select.front_limits(args.front)
        except ValueError as e:
            raise ConfigError(f"--front: expected {e}; got {args.front!r}") from None
        if config.max_flops is not None:
            raise ConfigError("--front gives the FLOPs limits: leave --max-flops out")
        results = select.select_front(config, args.search, out, base, limits, on_trial=on_trial)
        for limit, result in zip(limits, results):
            print_selection(console, result, f"under {limit / 1e6:g} MFLOPs", select.limit_dir(out, limit))
        console.print(f"wrote {out / select.FRONT_FILE}: one answer per limit", markup=False)
        return 0
    print_selection(console, select.select_from_search(config, args.search, out, base, on_trial=on_trial),
                    f"of {args.search}", out)
    return 0


def print_selection(console: Console, result: Any, what: str, out: Path) -> None:
    """The candidates' table, the verdict and where the answer is."""
    table = Table(title=f"effcifar select: {len(result.rows)} candidates {what}, rungs at epochs "
                        f"{', '.join(map(str, result.rungs))} (held-out accuracy chooses; test is only reported)")
    from effcifar.nas.select import TRIALS_DIR, above_curve

    for column in ("candidate", "source", "state", "supernet weights", "epochs", "held out", "vs width curve", "test",
                   "MFLOPs", "params"):
        table.add_column(column, justify="left" if column in ("candidate", "source", "state") else "right")
    percent = lambda v: "—" if v is None else f"{v:.2%}"  # noqa: E731
    for r in result.rows:
        mark = " *" if r["name"] == result.answer else ""
        curve = "—" if above_curve(r) is None else f"{above_curve(r) * 100:+.2f}"
        table.add_row(r["name"] + mark, r["source"], r["state"].lower(), percent(r["inherited_acc"]), str(r["epochs"]),
                      percent(r["holdout_acc"]), curve, percent(r["test_acc"]), f"{r['flops'] / 1e6:,.1f}",
                      f"{r['params']:,}")
    console.print(table)
    console.print(result.sentence, markup=False, soft_wrap=True)
    run = Path(result.chosen["run"] or out / TRIALS_DIR / result.answer)
    console.print(f"training work: {result.image_epochs:,} image-epochs, {result.train_seconds:.1f} s; "
                  f"wrote {out / 'select.json'} and {out / 'answer.json'}", markup=False, soft_wrap=True)
    everything = "--holdout 0" + (" --subset 0" if read_config_file(run / "config.yaml").get("subset") else "")
    console.print(f"the answer's network, widths and hyper-parameters again, on every training image: "
                  f"effcifar train --config {run / 'config.yaml'} {everything}", markup=False, soft_wrap=True)


def run_nas_eval(args: argparse.Namespace, console: Console) -> int:
    """effcifar nas-eval: rank correlation between supernet and standalone accuracy of random subnets."""
    from effcifar.nas import retrain

    if args.table is not None:
        return run_nas_eval_table(args, console)
    for option, given in (("--bn-batches", args.bn_batches is not None), ("--eval-images", args.eval_images != 0)):
        if given:
            raise EffcifarError(f"{option}: applies with --table only (without it each subnet trains standalone)")
    out = Path(args.out) if args.out else Path(args.supernet) / "nas_eval"
    args.trials = NAS_EVAL_TRIALS if args.trials is None else args.trials
    overrides = train_overrides(args)  # --seed also seeds the sample; --epochs is each subnet's training
    if "epochs" not in overrides:
        raise EffcifarError("--epochs: required (standalone training epochs of each subnet)")
    try:
        epochs, seed = int(overrides.pop("epochs")), int(overrides.get("seed", 0))
    except ValueError:
        raise EffcifarError("--epochs and --seed: expected integers") from None
    if args.score is not None:  # checked as --table checks it, so that the error names its source
        from effcifar.nas.search import SearchConfig

        build_config(SearchConfig, None, {"score": args.score}, overrides_from_text=True)
    retrain.nas_eval(args.supernet, args.trials, epochs, out, seed, args.config, overrides, overrides_from_text=True,
                     progress=lambda text: console.print(text, markup=False), repeats=args.repeats,
                     workers=args.workers, **({"score": args.score} if args.score else {}))
    print_ranking(read_json(out / "ranking.json", "ranking"), console)
    console.print(f"wrote {out / 'ranking.json'}, {out / 'ranking.png'} and {out / 'table.json'}", markup=False)
    return 0


def print_ranking(result: dict[str, Any], console: Console) -> None:
    """The rankers' table of a ranking.json (supernet, FLOPs, parameters, ceiling) and its verdict."""
    table = Table(title=f"ranking {result['n']} architectures (noise floor: the tau of two random orders has a "
                        f"standard deviation of {result['null_tau_sd']:.3f})")
    for column in ("ranker", "Kendall tau", "Spearman rho", "tau in top 10%", "top-10% overlap"):
        table.add_column(column, justify="right")
    number = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for r in result["rankers"]:
        table.add_row(r["name"], number(r["tau"]), number(r["rho"]), number(r["tau_top"]), number(r["top_overlap"]))
    console.print(table)
    console.print(result["verdict"], markup=False)


def run_nas_eval_table(args: argparse.Namespace, console: Console) -> int:
    """effcifar nas-eval --table: the supernet's ranking of a benchmark table's architectures, beside FLOPs and params."""
    from effcifar.nas import retrain
    from effcifar.nas.search import SearchConfig

    overrides = train_overrides(args)
    scoring = {"seed", "device", "precision", "threads", "eval_batch_size"}
    for name in overrides:
        if name not in scoring:
            option = f"--{name.replace('_', '-')}"
            raise EffcifarError(f"{option}: does not apply with --table (nothing is trained; "
                                f"scoring takes --seed, --device, --precision, --threads, --eval-batch-size)")
    if args.config is not None or args.repeats != 1 or args.workers != 1:
        option = "--config" if args.config is not None else "--repeats" if args.repeats != 1 else "--workers"
        raise EffcifarError(f"{option}: does not apply with --table (nothing is trained)")
    try:
        seed = int(overrides.pop("seed", 0))
        given = {"bn_batches": args.bn_batches, "eval_images": args.eval_images, "score": args.score}
        search = build_config(SearchConfig, None, {**overrides, **{k: str(v) for k, v in given.items() if v is not None}},
                              overrides_from_text=True)
    except ValueError:
        raise EffcifarError("--seed: expected an integer") from None
    sample = TABLE_SAMPLE if args.trials is None else args.trials
    out = Path(args.out) if args.out else Path(args.supernet) / "nas_eval_table"
    result = retrain.rank_against_table(args.supernet, args.table, sample, seed, out, search,
                                        progress=lambda text: console.print(text, markup=False))
    print_ranking(result, console)
    console.print(f"wrote {out / 'ranking.json'} and {out / 'ranking.png'}", markup=False)
    return 0


def pipeline_columns() -> list[ProgressColumn]:
    """The live view's row: stage, bar, units done of total, elapsed, time left, best so far."""
    return [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[best]}")]


class RichMonitor:
    """The pipeline's live view: one bar per stage (units done, elapsed, time left, best so far) over a log."""

    def __init__(self, progress: Progress, stages: int):
        self.progress, self.stages = progress, stages
        self.task: Any = None
        self.overall = progress.add_task("pipeline", total=stages, unit="stages", best="")

    def stage_started(self, stage: str, number: int, resumed: bool, unit: str, total: int | None, done: int) -> None:
        self.progress.console.print(f"[bold][{number}/{self.stages}] {stage}[/bold]" + (" (resumed)" if resumed else ""))
        self.task = self.progress.add_task(f"  {stage}", total=total, completed=done, unit=unit, best="")

    def stage_skipped(self, stage: str, number: int, reason: str) -> None:
        self.progress.console.print(f"[{number}/{self.stages}] {stage}: skipped ({reason})", markup=False)
        self.progress.advance(self.overall)

    def advance(self, done: int, total: int | None, best: str = "") -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=done, total=total, best=best)

    def line(self, text: str) -> None:
        self.progress.console.print(f"  {text}", markup=False, soft_wrap=True)

    def stage_finished(self, stage: str, seconds: float, summary: str) -> None:
        self.progress.remove_task(self.task)
        self.task = None
        self.progress.advance(self.overall)
        self.progress.console.print(f"  {stage} done in {seconds:.0f} s: {summary}", markup=False, soft_wrap=True)


class LineMonitor:
    """--quiet: plain timestamped log lines, no live view."""

    def __init__(self, stages: int):
        self.stages, self.start = stages, time.time()

    def print(self, text: str) -> None:
        elapsed = int(time.time() - self.start)
        print(f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {text}", flush=True)

    def stage_started(self, stage: str, number: int, resumed: bool, unit: str, total: int | None, done: int) -> None:
        resumed_text = f" (resumed: {done} of {total} {unit} done)" if resumed and total else " (resumed)" if resumed else ""
        self.print(f"[{number}/{self.stages}] {stage}{resumed_text}")

    def stage_skipped(self, stage: str, number: int, reason: str) -> None:
        self.print(f"[{number}/{self.stages}] {stage}: skipped ({reason})")

    def advance(self, done: int, total: int | None, best: str = "") -> None:
        pass

    def line(self, text: str) -> None:
        self.print(f"  {text}")

    def stage_finished(self, stage: str, seconds: float, summary: str) -> None:
        self.print(f"  {stage} done in {seconds:.0f} s: {summary}")


def parse_settings(pairs: Sequence[str]) -> dict[str, str]:
    """--set SECTION.FIELD=VALUE pairs as a mapping (text values; the pipeline checks them)."""
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise EffcifarError(f"--set {pair}: expected SECTION.FIELD=VALUE, e.g. search.trials=100")
        settings[name.strip()] = value.strip()
    return settings


def run_pipeline_command(args: argparse.Namespace, console: Console) -> int:
    """effcifar pipeline: the whole series, resumable; a table of the final results."""
    from effcifar import pipeline

    overrides = parse_settings(args.set or [])
    overrides.update({k: v for k, v in (("dataset", args.dataset), ("data_dir", args.data_dir), ("seeds", args.seeds),
                                        ("select.front", args.front)) if v is not None})
    config = pipeline.load_pipeline_config(args.preset, args.config, overrides)
    if args.show_config:
        print(f"# preset: {args.preset}")
        print(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None), end="")
        return 0
    out = Path(args.out) if args.out else Path("runs") / f"pipeline-{args.preset}-{config.dataset}"
    stages = len(pipeline.STAGES)
    if args.quiet:
        result = pipeline.run_pipeline(config, out, LineMonitor(stages))
    else:
        with Progress(*pipeline_columns(), console=console, disable=not console.is_terminal) as progress:
            result = pipeline.run_pipeline(config, out, RichMonitor(progress, stages))
    seeds = "one training seed each" if config.seeds == 1 else f"mean ± s.d. over {config.seeds} training seeds"
    table = Table(title=f"effcifar pipeline ({args.preset}, {config.dataset}): {out} (test accuracy: {seeds})")
    for column in ("method", "test accuracy", "train time", "params", "MFLOPs"):
        table.add_column(column, justify="right")
    for row in result.results:
        name = f"{row['name']} ({row['answer']})" if "answer" in row else row["name"]
        spread = f" ± {row['test_acc_sd']:.2%}" if "test_acc_sd" in row else ""
        table.add_row(name, f"{row['test_acc']:.2%}{spread}", f"{row['train_time']:.1f} s", f"{row['params']:,}",
                      f"{row['flops'] / 1e6:,.1f}")
    console.print(table)
    for row in result.results:
        if "verdict" in row:
            console.print(f"selection: {row['verdict']}", markup=False, soft_wrap=True)
    console.print(f"report: {result.report}", markup=False, soft_wrap=True)
    return 0


def run_report(args: argparse.Namespace, console: Console) -> int:
    """effcifar report: report.html and PNGs of a run or pipeline directory; lists sections drawn and missing."""
    from effcifar.report import make_report  # matplotlib only for this command

    report = make_report(args.run, args.out)
    console.print(f"wrote {report.path}", markup=False, soft_wrap=True)
    for section in report.sections:
        drawn = f"not drawn: {section.title}: {section.error}" if section.error else \
            f"drawn: {section.title} ({len(section.images)} plots)"
        console.print(f"  {drawn}  [{section.source}]", markup=False, soft_wrap=True)
    for what, command in report.missing:
        console.print(f"  missing: {what}: run {command}", markup=False, soft_wrap=True)
    return 0


def add_hpo_parser(sub: Any, command: str | None) -> None:
    """effcifar hpo run|status|best|export (run's options only when `command` is hpo or None: they import Optuna)."""
    hpo = sub.add_parser("hpo", help="hyper-parameter search (Optuna study; NNI search spaces and configs)")
    hpo_sub = hpo.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = hpo_sub.add_parser("run", help="run or resume a study (the same command again resumes)",
                           formatter_class=HelpFormatter)
    p.add_argument("--config", help="the trials' base: any run's config.yaml or an HPO best.json (TrainConfig "
                                    "fields; default: the recipe)")
    p.add_argument("--base", help="deprecated name of --config")
    p.add_argument("--experiment", help="NNI experiment config (v1 or v2 keys), e.g. examples/config.yml; options "
                                        "given here win")
    p.add_argument("--timeout", help="stop starting trials after this long: seconds or 30m, 2h, 1d")
    p.add_argument("--out", required=True, help="run directory, e.g. runs/hpo1")
    if command in (None, "hpo"):  # HpoConfig's module imports Optuna
        from effcifar.hpo.study import HpoConfig

        # --seed is the trials' training seed (a TrainConfig option below); the sampler's is --sampler-seed
        add_config_options(p, HpoConfig, exclude=HPO_OWN_OPTIONS, title="study (HpoConfig fields)", old_names=False)
        add_config_options(p, TrainConfig, exclude=HPO_TRIAL_EXCLUDED,
                           title="the trials' base (TrainConfig fields, over --config; holdout 0 holds out a tenth "
                                 "of subset, or 5000, unless --select-on-test)")
    for action, text in (("status", "counts by state and the top trials"),
                         ("best", "write best.json (usable as effcifar train --config best.json)"),
                         ("export", "write trials.csv and trials.json")):
        p = hpo_sub.add_parser(action, help=text)
        p.add_argument("run", help="the study's run directory")
        p.add_argument("--storage", help="the study's database URL, if it used one (default: as saved, without password)")
        if action == "best":
            p.add_argument("--tie", type=float, help="override the study's tie rule (percentage points)")
    hpo.set_defaults(handler=run_hpo)


def add_nas_parsers(sub: Any, command: str | None) -> None:
    """effcifar supernet train|space and effcifar search (its options only when `command` is search or None)."""
    supernet_parser = sub.add_parser("supernet", help="one-shot architecture search: the SPOS supernet")
    supernet_sub = supernet_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = supernet_sub.add_parser("train", help="train a supernet (SPOS); --resume continues a stopped run",
                                formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML or JSON file of SupernetConfig fields")
    p.add_argument("--out", required=True, help="run directory, e.g. runs/supernet1")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in --out (with its config.yaml unless --config)")
    p.add_argument("--quiet", action="store_true", help="plain log lines, no progress bar")
    add_config_options(p, SupernetConfig)
    p = supernet_sub.add_parser("space", help="show a space; --export writes it as NNI search-space JSON")
    p.add_argument("--space", default="seed", help="a built-in space (seed, seed-widths, nas-bench-macro) or a YAML/JSON declaration")
    p.add_argument("--export", help="write the NNI-format search space (layer_choice / input_choice) here")
    p.add_argument("--declaration", help="write the space declaration (YAML) here, to start your own")
    supernet_parser.set_defaults(handler=run_supernet)
    p = sub.add_parser("search", help="architecture search over a trained supernet (Optuna study; resumable)",
                       formatter_class=HelpFormatter)
    p.add_argument("supernet", help="a finished supernet run directory, e.g. runs/supernet1")
    p.add_argument("--config", help="YAML or JSON file of SearchConfig fields")
    p.add_argument("--out", required=True, help="search run directory, e.g. runs/search1 (the same command resumes)")
    p.add_argument("--quiet", action="store_true", help="no line per trial, only the final table")
    if command in (None, "search"):  # its fields are the options; the module imports Optuna (0.3 s)
        from effcifar.nas.search import SearchConfig

        add_config_options(p, SearchConfig)
    p.set_defaults(handler=run_search)


def add_retrain_parsers(sub: Any) -> None:
    """effcifar retrain and effcifar nas-eval: standalone training of architectures over a supernet run."""
    for name, text, run, run_help, count, old, count_help, written, handler in (
        ("retrain", "train the best N architectures of a search from scratch", "search",
         "a search run directory, e.g. runs/search1", "--best", "--top",
         "how many of the search's best to retrain: arch/top_1.json .. top_N.json",
         "top_1/, top_2/, ... and retrain.json (default: SEARCH/retrain)", run_retrain),
        ("nas-eval", "supernet ranking quality: Kendall tau over random subnets trained standalone (needs --epochs)",
         "supernet", "a finished supernet run directory, e.g. runs/supernet1", "--trials", "--sample",
         f"random subnets to train and rank (distinct architectures; --seed also seeds the draw; default "
         f"{NAS_EVAL_TRIALS})", "subnet_0/, ... and ranking.json/png (default: SUPERNET/nas_eval)", run_nas_eval),
    ):
        p = sub.add_parser(name, help=text, formatter_class=HelpFormatter)
        p.add_argument(run, help=run_help)
        dest = count.removeprefix("--")
        p.add_argument(count, type=int, metavar="N", default=1 if count == "--best" else None, help=count_help)
        add_deprecated_option(p, old, count, dest, type=int)
        p.add_argument("--config", help="TrainConfig file (e.g. best.json) over the supernet run's hyper-parameters")
        p.add_argument("--out", help=f"where to write {written}")
        add_config_options(p, TrainConfig, exclude=("arch",))  # the networks are the command's to choose
        p.set_defaults(handler=handler)
    p.add_argument("--table", help="rank against a benchmark table instead of training: 'nas-bench-macro' (built in) "
                                   "or a table file of that format; --trials architectures stratified over FLOPs "
                                   f"(default {TABLE_SAMPLE}; 0: every distinct network); writes SUPERNET/nas_eval_table")
    p.add_argument("--repeats", type=int, default=1, help="without --table: train each subnet with this many seeds "
                                                          "(their mean is the truth, their agreement its ceiling)")
    p.add_argument("--workers", type=int, default=1, help="without --table: training processes, each pinned to one "
                                                          "visible GPU round robin (several can share one GPU)")
    p.add_argument("--score", help="judge subnets on the supernet by (negative) held-out mean cross-entropy or by "
                                   "accuracy: loss (default) or accuracy")
    p.add_argument("--bn-batches", type=int, help="with --table: BN recalibration batches (default: the supernet run's)")
    p.add_argument("--eval-images", type=int, default=0,
                   help="with --table: score on this many held-out images, a seeded random sample (0: all)")


def add_select_parser(sub: Any, command: str | None) -> None:
    """effcifar select: selection by real training over a search run (its options only when `command` is select or None)."""
    p = sub.add_parser("select", help="choose among the search's best networks and the ResNet-9 by real training "
                                      "at rising fidelity (successive halving; resumable)",
                       formatter_class=HelpFormatter)
    p.add_argument("search", help="a finished search run directory, e.g. runs/search1")
    p.add_argument("--config", help="TrainConfig file (e.g. best.json) over the supernet run's hyper-parameters")
    p.add_argument("--out", help="where to write trials/, select.json and answer.json (default: SEARCH/select)")
    p.add_argument("--front", help="comma-separated FLOPs limits, e.g. 12e6,30e6,48e6: one selection under each (in "
                                   "OUT/flops_<M>M) and OUT/front.json, one answer per limit (instead of --max-flops)")
    if command in (None, "select"):  # the module imports Optuna
        from effcifar.nas.select import SelectConfig

        add_config_options(p, SelectConfig)
    add_config_options(p, TrainConfig, exclude=("arch",))  # the candidates are the search's
    p.set_defaults(handler=run_select)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The effcifar command and its subcommands.

    With `command`, only that subcommand gets the options that need a study module, so that
    `effcifar train` and `--help` import neither Optuna nor SQLAlchemy.
    """
    parser = argparse.ArgumentParser(prog="effcifar", description=effcifar.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"effcifar {effcifar.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="one training run (the cifar10-fast ResNet-9 recipe by default)",
                       formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML or JSON file of TrainConfig fields (e.g. a run's config.yaml or best.json)")
    p.add_argument("--out", help="run directory (default: runs/<dataset>-<time>); one that holds files is refused "
                                 "unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the training run in --out (it cannot resume); "
                                                            "the old one stays until the new one succeeds")
    p.add_argument("--quiet", action="store_true", help="plain log lines, no progress bar")
    add_config_options(p, TrainConfig)
    p.set_defaults(handler=run_train)

    p = sub.add_parser("data", help="download, describe or verify a dataset")
    p.add_argument("action", choices=["download", "info", "verify"],
                   help="download: fetch and extract the official archive (md5 checked); info: where the copy is and "
                        "what it holds; verify: check it (md5, parse, image counts)")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 (info also: synthetic, synthetic100)")
    p.add_argument("--data-dir", help="folder or file; default $EFFCIFAR_DATA, then ~/.cache/effcifar")
    p.set_defaults(handler=run_data)

    add_hpo_parser(sub, command)

    p = sub.add_parser("dashboard", help="browse a study's trials in Optuna's web dashboard",
                       formatter_class=HelpFormatter)
    p.add_argument("run", help="the study's run directory, e.g. runs/hpo1")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; another than loopback needs --allow-network")
    p.add_argument("--allow-network", action="store_true",
                   help="serve on a --host beyond this machine: optuna-dashboard has no login, and anyone who can "
                        "reach it can edit and delete studies")
    p.add_argument("--storage", help="the study's database URL, if it used one (default: as saved, without password)")
    p.set_defaults(handler=run_dashboard)
    add_nas_parsers(sub, command)
    p = sub.add_parser("pipeline", help="the whole series: baseline, HPO, supernet, search, selection, retrain, report "
                                        "(resumable)")
    p.add_argument("--preset", default="quick",
                   help="quick: about 10 minutes on a 2-core CPU; medium: about 30 minutes there; gpu: full CIFAR-10 "
                        "in about 8 minutes on one GPU; full: the original series' scale, hours on a GPU (default: quick)")
    p.add_argument("--config", help="YAML/JSON file over the preset (same layout: top-level fields and stage sections)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override one value, e.g. --set search.trials=100 --set subset=0 (repeatable)")
    p.add_argument("--seeds", metavar="N", help="train each final run (baseline, HPO best, the NAS answer) with this "
                                                "many training seeds and report mean ± s.d. (default 1; the same as "
                                                "--set seeds=N)")
    p.add_argument("--front", metavar="LIMITS",
                   help="comma-separated FLOPs limits, e.g. 12e6,30e6: the selection also answers under each (one "
                        "verified answer per limit in select/front.json; the search runs under the largest); the "
                        "final table keeps the answer at the default limit, the HPO best's FLOPs (the same as --set "
                        "select.front=LIMITS)")
    p.add_argument("--dataset", help="cifar100 (quick, medium and full), cifar10 (gpu), synthetic, ...")
    p.add_argument("--data-dir", help="folder or file of the dataset (default $EFFCIFAR_DATA, then ~/.cache/effcifar)")
    p.add_argument("--out", help="pipeline directory (default: runs/pipeline-PRESET-DATASET); the same command resumes")
    p.add_argument("--quiet", action="store_true", help="plain log lines, no live view")
    p.add_argument("--show-config", action="store_true", help="print every resolved setting as YAML and exit")
    p.set_defaults(handler=run_pipeline_command)
    p = sub.add_parser("report", help="HTML report with plots of a run or pipeline directory")
    p.add_argument("run", help="a run or pipeline directory, e.g. runs/NAME")
    p.add_argument("--out", help="where report.html and its PNGs go (default: RUN/report)")
    p.set_defaults(handler=run_report)
    add_retrain_parsers(sub)
    add_select_parser(sub, command)
    return parser


def stop_on_sigterm() -> None:
    """Stop on SIGTERM (kill, a scheduler ending a job) as on Ctrl-C: the running trial failed, locks released."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("terminated")

    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, interrupt)


def command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub)command's own parser that `argv` names, e.g. that of `hpo run`."""
    for word in argv:
        commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if commands and word in commands[0].choices:
            parser = commands[0].choices[word]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn our errors into one line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own usage, not the top level's
        command_parser(parser, argv).error(f"unrecognized arguments: {' '.join(unknown)}")
    # a log file or a pipe has no width: rich's 80 columns would cut the trial and result tables to 't…  s…'
    console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
    stop_on_sigterm()
    try:
        configure_allocator()  # before any tensor; HPO/search workers and torchrun ranks do it too
        return args.handler(args, console)
    except Interrupted as e:  # stopped by a signal after saving what resumes it
        print(f"effcifar {args.command}: {e}", file=sys.stderr)
        return 130
    except EffcifarError as e:  # our errors are one line; anything else is a bug and keeps its traceback
        print(f"effcifar {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"effcifar {args.command}: {e.args[0] if e.args else 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
