"""Standalone training of found architectures, and the supernet's ranking quality.

`retrain_top("runs/search1", 3, "runs/search1/retrain")` trains the search's `arch/top_1.json`
… `top_3.json` (rank 1 the best) from scratch with the core trainer (`TrainConfig.arch`), one run
directory each (`top_1/`, …), and writes `retrain.json` and `retrain.tsv`: supernet accuracy (held out,
after BN recalibration) beside the standalone accuracy.

`nas_eval("runs/supernet1", 20, 10, "runs/supernet1/nas_eval")` draws 20 distinct random
subnets, evaluates each on the supernet as the search does, trains each standalone
(`subnet_{i}/`) and reports Kendall tau, Spearman rho and the top-20% overlap between the two
accuracies in `ranking.json`, with a scatter plot `ranking.png`. Both accuracies are measured
on the supernet run's held-out split (the standalone runs validate on it).

`rank_against_table("runs/supernet1", "nas-bench-macro", 300)` needs no training: it scores
architectures of a benchmark table (stratified over FLOPs) with the supernet and compares the
supernet's ranking of them with the table's, next to FLOPs, parameters and the table's own
seed-to-seed agreement (`ranking.json` with `rankers` and a verdict, `ranking.png`).

The base config of the standalone runs is layered: the supernet run's fields that TrainConfig
shares (data, augmentation, optimiser, widths, hold-out, seed) < a `config` file (e.g. an HPO
best.json) < per-field overrides. An `epochs` override without `peak_epoch` keeps the
base schedule's shape (the peak at the same fraction of training; `effcifar.config`). Both commands
lock their output directory and resume:
a run with a summary.json is not trained again (it must have been made with the same config).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import random
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from effcifar.allocator import configure_allocator
from effcifar.atomic import atomic_write
from effcifar.config import build_config, flat_values, read_json
from effcifar.data import CifarData, load_dataset
from effcifar.errors import ConfigError
from effcifar.nas.costs import CostTable, stratified_archs
from effcifar.nas.ranking import (
    RankingReport, compare_rankers, null_tau_sd, scatter_plot, score_label, tau_difference, verdict,
)
from effcifar.nas.search import CandidateEvaluator, SearchConfig, load_supernet_config
from effcifar.nas.space import read_arch_file
from effcifar.nas.table import BenchmarkTable, table_key
from effcifar.rundir import locked
from effcifar.studies import die_with_parent, max_workers, pin_worker_gpu, stop_processes
from effcifar.train import TrainConfig, finished_summary, train, write_tsv

Progress = Callable[[str], None]


def base_config(supernet_dir: str | Path, config_file: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None, overrides_from_text: bool = False) -> TrainConfig:
    """The standalone runs' TrainConfig: supernet run's shared fields < config file < overrides."""
    supernet_dir = Path(supernet_dir)
    sconfig = load_supernet_config(supernet_dir)
    values = flat_values(sconfig)
    shared = {f.name for f in fields(TrainConfig)} & set(values) - {"space", "epochs"}
    base = (str(supernet_dir / "config.yaml"), {name: values[name] for name in sorted(shared)})
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
    return finished_summary(run_dir, config) or train(config, run_dir, data=data).summary


def standalone_row(summary: dict[str, Any]) -> dict[str, Any]:
    """Standalone figures of a finished run: test accuracy, held-out accuracy (if any), size and time."""
    row: dict[str, Any] = {"standalone_test_acc": summary["test_acc"]}
    if summary["dataset"]["valid_split"] == "holdout":
        row["standalone_holdout_acc"] = summary["final_valid_acc"]
    row.update(params=summary["params"], flops=summary["flops"], train_time=summary["train_time"])
    return row


def arch_files(search_dir: Path, best: int) -> list[Path]:
    """The search's exported files of ranks 1..best: arch/top_1.json .. (a search exported before ranks were
    numbered from 1 has top_0.json .. instead)."""
    first = 0 if (search_dir / "arch" / "top_0.json").is_file() else 1
    return [search_dir / "arch" / f"top_{first + i}.json" for i in range(best)]


def retrain_top(search_dir: str | Path, best: int, out_dir: str | Path | None = None, base: TrainConfig | None = None,
                progress: Progress | None = None) -> list[dict[str, Any]]:
    """Train the search's `best` best architectures from scratch into out_dir/top_{rank}; write retrain.json/.tsv;
    return the rows (rank 1: the best).

    `base` defaults to `base_config` of the search's supernet run; finished runs are reused.
    """
    search_dir = Path(search_dir)
    out = Path(out_dir) if out_dir is not None else search_dir / "retrain"
    if best < 1:
        raise ConfigError(f"--best: expected a positive integer, got {best}")
    supernet_dir = search_supernet_dir(search_dir)
    base = base or base_config(supernet_dir)
    files = arch_files(search_dir, best)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        exported = sum(f.is_file() for f in files)
        raise ConfigError(f"{missing[0]}: no such architecture file (" + (
            f"the search exported {exported} of the best {best}; lower --best)" if exported else
            "the search has exported none: run it to the end first)"))
    space = load_supernet_config(supernet_dir).space  # for files that do not embed their space
    configs = [dataclasses.replace(base, arch=str(f.resolve()), space=space) for f in files]
    for config in configs:
        config.validate()  # every file is checked before anything trains
    with locked(out, "retrain"):
        data = load_dataset(base.dataset, base.data_dir)
        rows = []
        for rank, (file, config) in enumerate(zip(files, configs), 1):
            if progress is not None:
                progress(f"top_{rank}: {file}")
            record = read_arch_file(file)
            summary = train_once(config, out / f"top_{rank}", data)
            rows.append({"rank": rank, "trial": record.get("trial", ""), "supernet_loss": record.get("loss", ""),
                         "supernet_acc": record.get("accuracy", ""), **standalone_row(summary)})
        atomic_write(out / "retrain.json", json.dumps(rows, indent=2) + "\n")
        write_tsv(out / "retrain.tsv", rows)
    return rows


MAX_SAMPLE = 10_000  # subnets nas-eval trains: beyond any run's means, and a bound on the sampling work


def train_all(jobs: list[tuple[TrainConfig, Path]], workers: int = 1, data: CifarData | None = None,
              progress: Progress | None = None) -> list[dict[str, Any]]:
    """The summaries of (config, run directory) jobs, finished ones reused (`train_once`), in job order.

    With `workers` > 1 they run in that many processes, each pinned to one visible GPU (round
    robin) and holding the data once: small networks leave a GPU mostly idle, so several share it.
    """
    if workers <= 1 or len(jobs) <= 1:
        data = data or load_dataset(jobs[0][0].dataset, jobs[0][0].data_dir)
        summaries = []
        for i, (config, run_dir) in enumerate(jobs):
            summaries.append(train_once(config, run_dir, data))
            if progress is not None:
                progress(f"trained {i + 1}/{len(jobs)}: {run_dir}")
        return summaries
    index = multiprocessing.get_context("spawn").Value("i", 0)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_start_worker,
                                                initargs=(index, threads, os.getpid())) as pool:
        futures = {pool.submit(_train_job, config, run_dir): i for i, (config, run_dir) in enumerate(jobs)}
        summaries: list[dict[str, Any]] = [{}] * len(jobs)
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures)):
                summaries[futures[future]] = future.result()
                if progress is not None:
                    progress(f"trained {done + 1}/{len(jobs)}: {jobs[futures[future]][1]}")
        except BaseException:  # Ctrl-C, SIGTERM or a failed run: no queued run starts, the running ones stop
            processes = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown forgets them
            pool.shutdown(wait=False, cancel_futures=True)
            stop_processes(processes)
            raise
    return summaries


_WORKER_DATA: dict[tuple[str, str | None], CifarData] = {}


def _start_worker(counter: Any, threads: int, parent: int) -> None:
    """A training worker: it dies with its command; the CLI's malloc settings; the next index pins its GPU; CPU
    threads split the cores."""
    die_with_parent(parent)
    configure_allocator()
    with counter.get_lock():
        index, counter.value = counter.value, counter.value + 1
    pin_worker_gpu(index)
    torch.set_num_threads(threads)


def _train_job(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    key = (config.dataset, config.data_dir)
    if key not in _WORKER_DATA:  # loaded once per worker process
        _WORKER_DATA[key] = load_dataset(*key)
    return train_once(config, run_dir, _WORKER_DATA[key])


def nas_eval(supernet_dir: str | Path, trials: int, epochs: int, out_dir: str | Path | None = None, seed: int = 0,
             config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
             overrides_from_text: bool = False, progress: Progress | None = None, repeats: int = 1,
             workers: int = 1, score: str = SearchConfig.score) -> RankingReport:
    """Supernet vs standalone accuracy of `trials` subnets spread over FLOPs; ranking.json and ranking.png (resumable).

    Each subnet trains `repeats` times (training seeds seed, seed + 1, ...); their mean is the
    truth, and their agreement with each other is the truth's own ceiling. The trained subnets
    are also written as a benchmark table (`table.json`, held-out accuracies in %), so the same
    comparison (supernet against FLOPs, parameters and the ceiling) applies as with `--table`,
    and any other supernet of the space can be ranked against it later. `workers` trains in
    parallel processes (see `train_all`).
    """
    supernet_dir = Path(supernet_dir)
    out = Path(out_dir) if out_dir is not None else supernet_dir / "nas_eval"
    if trials < 2:
        raise ConfigError(f"--trials: expected at least 2 subnets to rank, got {trials}")
    if repeats < 1:
        raise ConfigError(f"--repeats: expected a positive number of training seeds, got {repeats}")
    if not 1 <= workers <= max_workers():
        raise ConfigError(f"--workers: expected 1 to {max_workers()} training processes on this machine, got {workers}")
    if trials > MAX_SAMPLE:
        raise ConfigError(f"--trials: expected at most {MAX_SAMPLE} subnets to train, got {trials}")
    sconfig = load_supernet_config(supernet_dir)
    config = base_config(supernet_dir, config_file, {**(overrides or {}), "epochs": epochs}, overrides_from_text)
    config = dataclasses.replace(config, holdout=sconfig.holdout)  # both accuracies on the same held-out images
    search = SearchConfig(device=config.device, precision=sconfig.precision, eval_batch_size=sconfig.eval_batch_size,
                          threads=config.threads, score=score)
    search.validate()
    with locked(out, "nas-eval"):
        evaluator = CandidateEvaluator.from_run(supernet_dir, search)
        if trials > evaluator.space.size():
            raise ConfigError(f"--trials: expected at most the {evaluator.space.size()} architectures of the space, "
                              f"got {trials}")
        archs = stratified_archs(evaluator.space, evaluator.costs, trials, random.Random(seed))
        if len(archs) < trials:
            raise ConfigError(f"--trials: found only {len(archs)} distinct architectures in the space, "
                              f"{trials} were asked for")
        jobs = []
        for i, arch in enumerate(archs):
            file = out / "archs" / f"subnet_{i}.json"
            atomic_write(file, json.dumps({"arch": arch, "space": evaluator.space.to_dict()}, indent=2) + "\n")
            jobs += [(dataclasses.replace(config, arch=str(file.resolve()), seed=config.seed + r),
                      out / (f"subnet_{i}" if r == 0 else f"subnet_{i}_seed{config.seed + r}")) for r in range(repeats)]
        summaries = train_all(jobs, workers, progress=progress)
        rows, scores = {}, {}
        for i, arch in enumerate(archs):
            accs = [summary["final_valid_acc"] * 100 for summary in summaries[i * repeats:(i + 1) * repeats]]
            key = table_key(evaluator.net.space, arch)
            evaluation = evaluator.evaluate(arch)[0]
            scores[key] = (evaluation.accuracy, evaluation.loss)
            rows[key] = {"mean_acc": float(np.mean(accs)), "test_acc": accs, "params": evaluator.costs.params_of(arch),
                         "flops": evaluator.costs.flops_of(arch), "arch": arch}
        atomic_write(out / "table.json", json.dumps(rows, indent=2) + "\n")  # held-out accuracy, in %, per seed
        bench = BenchmarkTable.load(out / "table.json", evaluator.net.space)
        result = ranking_result(bench, list(rows), scores, evaluator.costs, seed, score)
        report = RankingReport.compute(result["supernet_score"], result["standalone_acc"])
        result = {**result, "archs": archs, **asdict(report), "epochs": epochs, "repeats": repeats, "seed": seed,
                  "supernet": str(supernet_dir.resolve())}
        write_ranking(out, result, f"{report.n} subnets over FLOPs, {epochs} epochs standalone x {repeats}",
                      "standalone accuracy" + (f" (mean of {repeats} seeds)" if repeats > 1 else ""))
    return report


def rank_against_table(supernet_dir: str | Path, table: str | Path, sample: int = 300, seed: int = 0,
                       out_dir: str | Path | None = None, search: SearchConfig | None = None,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Score `sample` table architectures (stratified over FLOPs; 0: every distinct network) with the supernet.

    Each is evaluated as the search does (BN as the supernet run says, its held-out images;
    `search` sets the batches, images and device). Writes `ranking.json` (see `ranking_result`)
    and `ranking.png`, and returns the same dict. Scores are kept in `scores.json` as they come,
    so an interrupted run continues where it stopped; `score_seconds` adds up the scoring time of
    every run that scored them (a re-run served from the file adds next to nothing).
    """
    supernet_dir = Path(supernet_dir)
    out = Path(out_dir) if out_dir is not None else supernet_dir / "nas_eval_table"
    search = search or SearchConfig()
    evaluator = CandidateEvaluator.from_run(supernet_dir, search)
    bench = BenchmarkTable.load_named(table, evaluator.net.space)
    keys = [key for key in bench.sample(sample, seed) if _in_space(evaluator, bench.arch(key))]
    if len(keys) < 2:
        raise ConfigError(f"{bench.path}: fewer than 2 of its architectures are in the supernet's final space")
    setup = {"supernet": str(supernet_dir.resolve()), "table": str(bench.path), "bn_batches": search.bn_batches,
             "eval_images": search.eval_images, "precision": search.precision}
    with locked(out, "nas-eval"):
        scores_file = out / "scores.json"
        scores, earlier = _saved_scores(scores_file, setup)  # key -> (acc, loss); the scoring time of earlier runs
        started = time.perf_counter()

        def save() -> float:
            seconds = earlier + time.perf_counter() - started
            atomic_write(scores_file, json.dumps({"setup": setup, "scores": scores, "seconds": seconds}) + "\n")
            return seconds

        for i, key in enumerate(keys):
            if key not in scores:
                evaluation = evaluator.evaluate(bench.arch(key))[0]
                scores[key] = (evaluation.accuracy, evaluation.loss)
                if progress is not None:
                    progress(f"{i + 1}/{len(keys)} {key}: supernet {evaluation.accuracy:.4f} (loss {evaluation.loss:.4f}), "
                             f"table {bench.rows[key].mean_acc:.4f}")
                if len(scores) % 10 == 0:
                    save()
        seconds = save()
        result = {**ranking_result(bench, keys, scores, evaluator.costs, seed, search.score), **setup, "sample_seed": seed,
                  "score_seconds": seconds}
        return write_ranking(out, result, f"{len(keys)} architectures of {bench.path.name}",
                             "table accuracy (mean of its seeds)")


def _saved_scores(path: Path, setup: Mapping[str, Any]) -> tuple[dict[str, tuple[float, float]], float]:
    """The scores and scoring seconds an earlier run of the same setup kept in `path`; none for another setup."""
    saved = read_json(path, "supernet scores") if path.is_file() else {}
    if not isinstance(saved, dict) or saved.get("setup") != setup:
        return {}, 0.0
    scores, seconds = saved.get("scores"), saved.get("seconds")
    if not isinstance(scores, dict) or not all(isinstance(v, list) and len(v) == 2 and all(map(_is_number, v))
                                               for v in scores.values()):
        raise ConfigError(f"{path}: field 'scores': expected a mapping of table key -> [accuracy, loss] "
                          "(delete the file to score again)")
    if not _is_number(seconds) or seconds < 0:
        raise ConfigError(f"{path}: field 'seconds': expected a number >= 0, got {seconds!r} "
                          "(delete the file to score again)")
    return {key: (float(acc), float(loss)) for key, (acc, loss) in scores.items()}, float(seconds)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ranking_result(bench: BenchmarkTable, keys: list[str], scores: Mapping[str, tuple[float, float]],
                   costs: CostTable, seed: int, score: str) -> dict[str, Any]:
    """The supernet's ranking of `keys` (by `score`, from each key's (accuracy, loss)) against the table's, beside
    FLOPs, parameters and the seed-to-seed ceiling.

    Also the supernet's lead over FLOPs in tau with its paired-bootstrap standard error, the
    verdict sentence, the noise floor, and how our FLOPs and parameter counts match the table's.
    """
    rows = [bench.rows[key] for key in keys]
    truth, flops = [row.mean_acc for row in rows], [row.flops for row in rows]
    supernet = [scores[key][0] if score == "accuracy" else -scores[key][1] for key in keys]  # what it ranks by
    rankers = compare_rankers(truth, {"supernet": supernet, "FLOPs": flops, "parameters": [row.params for row in rows]},
                              np.array([row.seed_accs for row in rows]))
    difference, se = tau_difference(supernet, flops, truth, seed=seed)
    return {
        "table": str(bench.path), "space": bench.space.choices(), "n": len(keys), "keys": keys, "score": score,
        "supernet_acc": [scores[key][0] for key in keys], "supernet_score": supernet,
        "standalone_acc": truth, "standalone_seed_acc": [list(row.seed_accs) for row in rows], "flops": flops,
        "params": [row.params for row in rows], "rankers": [asdict(r) for r in rankers],
        "tau_vs_flops": {"difference": difference, "se": se}, "null_tau_sd": null_tau_sd(len(keys)),
        "verdict": verdict(rankers[0], rankers[1], difference, se), "flops_ratio": bench.flops_ratio(costs),
        "params_mismatches": len(bench.params_mismatches(costs)),
    }


def write_ranking(out: Path, result: dict[str, Any], title: str, ylabel: str) -> dict[str, Any]:
    """ranking.json and the scatter plot ranking.png; the result as written (NaN as null)."""
    result = _nan_as_null(result)
    atomic_write(out / "ranking.json", json.dumps(result, indent=2) + "\n")
    scatter_plot(result["supernet_score"], result["standalone_acc"], out / "ranking.png", ylabel=ylabel, title=title,
                 xlabel=score_label(result["score"]))
    return result


def _in_space(evaluator: CandidateEvaluator, arch: Mapping[str, str]) -> bool:
    """Whether the supernet's final (possibly shrunk) space holds `arch`."""
    return all(arch[key] in candidates for key, candidates in evaluator.space.choices().items())


def _nan_as_null(value: Any) -> Any:
    """NaN (a measure of a sample without spread) as null, so the file is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_as_null(v) for k, v in value.items()}
    return [_nan_as_null(v) for v in value] if isinstance(value, list) else value
