"""Standalone training of found architectures, and the supernet's ranking quality.

`retrain_top("runs/search1", 3, "runs/search1/retrain")` trains the search's `arch/top_0.json`
… `top_2.json` from scratch with the core trainer (`TrainConfig.arch`), one run directory
each (`top_0/`, …), and writes `retrain.json` and `retrain.tsv`: supernet accuracy (held out,
after BN recalibration) beside the standalone accuracy.

`nas_eval("runs/supernet1", 20, 10, "runs/supernet1/nas_eval")` samples distinct random
subnets, evaluates each on the supernet as the search does, trains each standalone
(`subnet_{i}/`) and reports Kendall tau, Spearman rho and the top-20% overlap between the two
accuracies in `ranking.json`, with a scatter plot `ranking.png`. Both accuracies are measured
on the supernet run's held-out split (the standalone runs validate on it).

The base config of the standalone runs is layered: the supernet run's fields that TrainConfig
shares (data, augmentation, optimiser, widths, hold-out, seed) < a `config` file (e.g. an HPO
best.json) < per-field overrides. A `total_epoch` override without `peak_epoch` keeps the
base schedule's shape (the peak at the same fraction of training; `effcifar.config`). Both commands
lock their output directory and resume:
a run with a summary.json is not trained again (it must have been made with the same config).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from effcifar.atomic import atomic_write
from effcifar.config import build_config, fingerprint, read_json, result_values
from effcifar.data import CifarData, load_dataset
from effcifar.errors import ConfigError
from effcifar.nas.ranking import RankingReport, scatter_plot
from effcifar.nas.search import CandidateEvaluator, SearchConfig, load_supernet_config
from effcifar.nas.space import arch_key, distinct_random_archs, read_arch_file
from effcifar.nas.supernet import SupernetConfig
from effcifar.rundir import locked
from effcifar.train import TrainConfig, train, write_tsv

Progress = Callable[[str], None]


def base_config(supernet_dir: str | Path, config_file: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None, overrides_from_text: bool = False) -> TrainConfig:
    """The standalone runs' TrainConfig: supernet run's shared fields < config file < overrides."""
    supernet_dir = Path(supernet_dir)
    sconfig = load_supernet_config(supernet_dir)
    shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(SupernetConfig)} - {"space"}
    base = (str(supernet_dir / "config.yaml"), {name: getattr(sconfig, name) for name in sorted(shared)})
    return build_config(TrainConfig, config_file, overrides, overrides_from_text, base=base)


def search_supernet_dir(search_dir: str | Path) -> Path:
    """The supernet run a search run was made on (its supernet.txt)."""
    path = Path(search_dir) / "supernet.txt"
    try:
        return Path(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"{search_dir}: not a search run (no supernet.txt; run `effcifar search` first)") from None


def train_once(config: TrainConfig, run_dir: Path, data: CifarData) -> dict[str, Any]:
    """The summary of `run_dir`: its finished run's if it has one (with the same config), else a new run's."""
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = read_json(summary_path, "run summary")
        done, wanted = result_values(TrainConfig(**summary["config"])), result_values(config)
        if fingerprint(done) != fingerprint(wanted):
            changed = sorted(k for k in wanted if done.get(k) != wanted[k])
            raise ConfigError(f"{run_dir}: finished with another config ({', '.join(changed)} differ); "
                              f"use the same options or another --out")
        return summary
    return train(config, run_dir, data=data).summary


def standalone_row(summary: dict[str, Any]) -> dict[str, Any]:
    """Standalone figures of a finished run: test accuracy, held-out accuracy (if any), size and time."""
    row: dict[str, Any] = {"standalone_test_acc": summary["test_acc"]}
    if summary["dataset"]["valid_split"] == "holdout":
        row["standalone_holdout_acc"] = summary["final_valid_acc"]
    row.update(params=summary["params"], flops=summary["flops"], train_time=summary["train_time"])
    return row


def retrain_top(search_dir: str | Path, top: int, out_dir: str | Path | None = None, base: TrainConfig | None = None,
                progress: Progress | None = None) -> list[dict[str, Any]]:
    """Train arch/top_0..top-1 of a search from scratch into out_dir/top_{i}; write retrain.json/.tsv; return the rows.

    `base` defaults to `base_config` of the search's supernet run; finished runs are reused.
    """
    search_dir = Path(search_dir)
    out = Path(out_dir) if out_dir is not None else search_dir / "retrain"
    if top < 1:
        raise ConfigError(f"--top: expected a positive integer, got {top}")
    supernet_dir = search_supernet_dir(search_dir)
    base = base or base_config(supernet_dir)
    files = [search_dir / "arch" / f"top_{i}.json" for i in range(top)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{missing[0]}: no such architecture file (the search exported "
                          f"{sum(f.is_file() for f in files)} of the top {top}; lower --top)")
    space = load_supernet_config(supernet_dir).space  # for files that do not embed their space
    configs = [dataclasses.replace(base, arch=str(f.resolve()), space=space) for f in files]
    for config in configs:
        config.validate()  # every file is checked before anything trains
    with locked(out):
        data = load_dataset(base.dataset, base.data_dir)
        rows = []
        for i, (file, config) in enumerate(zip(files, configs)):
            if progress is not None:
                progress(f"top_{i}: {file}")
            record = read_arch_file(file)
            summary = train_once(config, out / f"top_{i}", data)
            rows.append({"rank": i, "trial": record.get("trial", ""), "supernet_acc": record.get("accuracy", ""),
                         **standalone_row(summary)})
        atomic_write(out / "retrain.json", json.dumps(rows, indent=2) + "\n")
        write_tsv(out / "retrain.tsv", rows)
    return rows


def sample_archs(evaluator: CandidateEvaluator, count: int, seed: int) -> list[dict[str, str]]:
    """`count` random architectures with distinct canonical keys (uniform per choice), in a seeded order."""
    archs = distinct_random_archs(evaluator.space, count, random.Random(seed))
    if len(archs) < count:
        raise ConfigError(f"--sample: found only {len(archs)} distinct architectures in the space, "
                          f"{count} were asked for")
    return archs


def nas_eval(supernet_dir: str | Path, sample: int, epochs: int, out_dir: str | Path | None = None, seed: int = 0,
             config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
             overrides_from_text: bool = False, progress: Progress | None = None) -> RankingReport:
    """Supernet vs standalone accuracy of `sample` random subnets; write ranking.json and ranking.png (resumable)."""
    supernet_dir = Path(supernet_dir)
    out = Path(out_dir) if out_dir is not None else supernet_dir / "nas_eval"
    if sample < 2:
        raise ConfigError(f"--sample: expected at least 2 subnets to rank, got {sample}")
    sconfig = load_supernet_config(supernet_dir)
    config = base_config(supernet_dir, config_file, {**(overrides or {}), "total_epoch": epochs}, overrides_from_text)
    config = dataclasses.replace(config, holdout=sconfig.holdout)  # both accuracies on the same held-out images
    with locked(out):
        evaluator = CandidateEvaluator.from_run(supernet_dir, SearchConfig(
            device=config.device, precision=sconfig.precision, eval_batch_size=sconfig.eval_batch_size,
            threads=config.threads))
        archs = sample_archs(evaluator, sample, seed)
        data = load_dataset(config.dataset, config.data_dir)
        supernet_acc, standalone_acc = [], []
        for i, arch in enumerate(archs):
            if progress is not None:
                progress(f"subnet {i + 1}/{sample}: {arch_key(evaluator.space, arch)}")
            supernet_acc.append(evaluator.evaluate(arch)[0].accuracy)
            file = out / "archs" / f"subnet_{i}.json"
            atomic_write(file, json.dumps({"arch": arch, "space": evaluator.space.to_dict()}, indent=2) + "\n")
            summary = train_once(dataclasses.replace(config, arch=str(file.resolve())), out / f"subnet_{i}", data)
            standalone_acc.append(summary["final_valid_acc"])
        report = RankingReport.compute(supernet_acc, standalone_acc)
        measures = {k: v if v == v else None for k, v in asdict(report).items()}  # NaN (no spread) as null
        result = {"supernet_acc": supernet_acc, "standalone_acc": standalone_acc, "archs": archs, **measures,
                  "epochs": epochs, "seed": seed, "supernet": str(supernet_dir.resolve())}
        atomic_write(out / "ranking.json", json.dumps(result, indent=2) + "\n")
        scatter_plot(supernet_acc, standalone_acc, out / "ranking.png",
                     title=f"{report.n} random subnets, {epochs} epochs standalone")
    return report
